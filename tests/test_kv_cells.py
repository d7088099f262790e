"""Tests of the KV-cell bookkeeping: properties against a simulated unified cache (fast), then against llama.cpp."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from sot.backends.local.kv_cells import KvCells, SeqCp, SeqRm, Slot, SlotState
from sot.backends.local.llama_runtime import ContextParams, LlamaRuntime
from sot.backends.local.model_files import packaged_model_path

Op = tuple[Any, ...]

# ------------------------------------------------------------------------------------------ a simulated cache


class SimCache:
    """llama.cpp's unified KV cache as far as cells go: a decoded token takes an empty cell; `seq_cp` tags
    cells with one more sequence; `seq_rm` removes a tag and empties the cell when none is left."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cells: list[tuple[int, int, set[int]] | None] = [None] * size  # (pos, token, sequences)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        hi = p1 if p1 >= 0 else 1 << 30
        for cell in self.cells:
            if cell is not None and src in cell[2] and p0 <= cell[0] < hi:
                cell[2].add(dst)

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        lo, hi = (p0 if p0 >= 0 else 0), (p1 if p1 >= 0 else 1 << 30)
        for i, cell in enumerate(self.cells):
            if cell is not None and seq in cell[2] and lo <= cell[0] < hi:
                cell[2].discard(seq)
                if not cell[2]:
                    self.cells[i] = None

    def decode(self, seq: int, tokens: list[int], start: int) -> bool:
        """Place the tokens (positions start, start+1, ...) in empty cells; False, changing nothing, if the
        cache has too few (llama_decode's return code 1)."""
        empty = [i for i, c in enumerate(self.cells) if c is None]
        if len(empty) < len(tokens):
            return False
        for i, (cell, token) in enumerate(zip(empty, tokens, strict=False)):
            self.cells[cell] = (start + i, token, {seq})
        return True

    def used(self) -> int:
        return sum(c is not None for c in self.cells)

    def tokens_of(self, seq: int) -> list[int]:
        held = sorted((c[0], c[1]) for c in self.cells if c is not None and seq in c[2])
        if [p for p, _ in held] != list(range(len(held))):
            raise AssertionError(f"sequence {seq} holds positions {[p for p, _ in held]}")
        return [t for _, t in held]

    def check(self, book: KvCells) -> None:
        assert book.used == self.used() <= self.size
        for s in book.slots:
            assert self.tokens_of(s.seq) == s.tokens, f"sequence {s.seq}"


# ------------------------------------------------------------------------------------------ random programs


class Cache(Protocol):
    def decode(self, seq: int, tokens: list[int], start: int) -> bool: ...
    def check(self, book: KvCells) -> None: ...


# Prompts share prefixes: a few stems, cut at random places, plus a random tail.
STEMS = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [11, 12, 13, 30, 31, 32, 33], [40, 41, 42, 43, 44]]

prompts = st.builds(
    lambda stem, cut, tail: (STEMS[stem][:cut] + tail) or [1],
    st.integers(0, len(STEMS) - 1),
    st.integers(0, 12),
    st.lists(st.integers(50, 60), max_size=4),
)
admits = st.tuples(st.just("admit"), prompts, st.integers(0, 24))
grows = st.tuples(st.just("grow"), st.integers(0, 7), st.integers(1, 24))
finishes = st.tuples(st.just("finish"), st.integers(0, 7), st.booleans())
evicts = st.just(("evict",))
clears = st.just(("clear",))
# Weighted so that cells fill up, cache is retained and admission has to wait or evict.
_WEIGHTS = {"admit": 10, "grow": 14, "finish": 10, "evict": 2, "clear": 1}
_KINDS = {"admit": admits, "grow": grows, "finish": finishes, "evict": evicts, "clear": clears}
ops = st.sampled_from([k for k, w in _WEIGHTS.items() for _ in range(w)]).flatmap(lambda k: _KINDS[k])


@dataclasses.dataclass
class Running:
    slot: Slot
    prompt: list[int]


def _state(book: KvCells) -> list[tuple[int, list[int], SlotState, int]]:
    return [(s.seq, list(s.tokens), s.state, s.reserve) for s in book.slots]


def run_program(program: list[Op], book: KvCells, cache: Cache) -> None:
    """Apply `program` as a scheduler would, checking the book and the cache agree after every step."""
    running: list[Running] = []
    next_token = 100
    for op in program:
        kind = op[0]
        if kind == "admit":
            prompt, extra = op[1], op[2]
            before, shortfall = _state(book), book.shortfall(prompt, len(prompt) + extra)
            free_slot = any(s.state is SlotState.FREE for s in book.slots)
            held = {id(r.slot): list(r.slot.tokens) for r in running}
            evictions = book.evictions
            slot = book.admit(prompt, len(prompt) + extra)
            if currently_in_test_context():  # hypothesis statistics: how often admission waited or evicted
                event("admit: " + ("refused" if slot is None else "evicted" if book.evictions > evictions else "ok"))
            if slot is None:
                assert shortfall > 0 or not free_slot
                assert _state(book) == before  # refused: nothing changed
            else:
                assert shortfall == 0 and free_slot
                assert slot.tokens == prompt[: len(slot.tokens)] and len(slot.tokens) < len(prompt)
                running.append(Running(slot, prompt))
            # Running sequences are never touched to make room.
            assert all(list(r.slot.tokens) == held[id(r.slot)] for r in running if id(r.slot) in held)
        elif kind == "grow" and running:
            r = running[op[1] % len(running)]
            k = min(op[2], r.slot.outstanding)
            done = len(r.slot.tokens)
            tokens = r.prompt[done : done + k]
            while len(tokens) < k:  # past the prompt: generated tokens
                tokens.append(next_token % 90 + 100)
                next_token += 1
            if tokens:
                # Within its reservation a sequence always finds cells: the invariant admission keeps.
                assert cache.decode(r.slot.seq, tokens, done), "decode found no room within a reservation"
                book.grow(r.slot, tokens)
        elif kind == "finish" and running:
            r = running.pop(op[1] % len(running))
            book.finish(r.slot, retain=op[2])
        elif kind == "evict":
            n_retained = len(book.in_state(SlotState.RETAINED))
            assert book.evict_lru() == (n_retained > 0)
        elif kind == "clear":
            book.clear_retained()
            assert not book.in_state(SlotState.RETAINED)
        book.check()
        cache.check(book)
        assert book.used + book.reserved <= book.capacity
        assert book.pinned <= book.used
        assert sum(len(s.cells) for s in book.slots) >= book.used  # shared cells counted once


def _book(seq_cp: SeqCp, seq_rm: SeqRm, capacity: int, n_slots: int, max_retained: int) -> KvCells:
    return KvCells(capacity=capacity, n_slots=n_slots, max_retained=max_retained, seq_cp=seq_cp, seq_rm=seq_rm)


@settings(max_examples=500, deadline=None)
@given(
    program=st.lists(ops, min_size=10, max_size=80),
    capacity=st.integers(24, 80),
    max_active=st.integers(1, 4),
    max_retained=st.integers(0, 3),
)
def test_random_programs_keep_the_book_and_the_cache_in_step(
    program: list[Op], capacity: int, max_active: int, max_retained: int
) -> None:
    sim = SimCache(capacity)
    # Shaped as the scheduler shapes it: a slot for every running request and every retained one.
    book = _book(sim.seq_cp, sim.seq_rm, capacity, max_active + max_retained, max_retained)
    run_program(program, book, sim)
    for s in book.in_state(SlotState.ACTIVE):
        book.finish(s, retain=False)
    book.clear_retained()
    assert book.used == sim.used() == 0  # a freed slot's cells are released


# ------------------------------------------------------------------------------------------ examples


def _fresh(capacity: int = 40, n_slots: int = 4, max_retained: int = 2) -> tuple[KvCells, SimCache]:
    sim = SimCache(capacity)
    return _book(sim.seq_cp, sim.seq_rm, capacity, n_slots, max_retained), sim


def _run(book: KvCells, sim: SimCache, prompt: list[int], reserve: int, generated: int = 0) -> Slot:
    slot = book.admit(prompt, reserve)
    assert slot is not None
    rest = prompt[len(slot.tokens) :] + list(range(200, 200 + generated))
    assert sim.decode(slot.seq, rest, len(slot.tokens))
    book.grow(slot, rest)
    return slot


def test_a_fork_shares_the_prefix_cells_and_counts_them_once() -> None:
    book, sim = _fresh()
    a = _run(book, sim, [1, 2, 3, 4, 5, 6], 10)
    book.finish(a)
    b = _run(book, sim, [1, 2, 3, 4, 9], 8)  # forks 4 cells, computes 1
    assert b.cells[:4] == a.cells[:4]
    assert book.used == sim.used() == 7
    assert book.reserved == 8 - 5 and book.pinned == 5


def test_admission_leaves_room_for_every_running_request_to_reach_its_reservation() -> None:
    book, sim = _fresh(capacity=40)
    a = _run(book, sim, list(range(1, 11)), 30)  # holds 10, may grow to 30
    assert book.shortfall(list(range(60, 71)), 11) == 1
    assert book.admit(list(range(60, 71)), 11) is None  # 30 + 11 > 40: it waits
    assert book.admit(list(range(60, 70)), 10) is not None  # 30 + 10 fits exactly
    assert sim.decode(a.seq, list(range(300, 320)), 10)  # a can still decode all of its reservation
    book.grow(a, list(range(300, 320)))
    book.check()


def test_admission_evicts_least_recently_used_cache_only_as_far_as_needed() -> None:
    book, sim = _fresh(capacity=40, n_slots=5, max_retained=3)
    old = _run(book, sim, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10)
    book.finish(old)
    new = _run(book, sim, [20, 21, 22, 23, 24, 25, 26, 27, 28, 29], 10)
    book.finish(new)
    assert book.used == 20 and len(book.in_state(SlotState.RETAINED)) == 2
    c = book.admit([30, 31], 25)  # needs 25: evicting the older entry (10 cells) is enough
    assert c is not None
    assert old.state is SlotState.FREE and new.state is SlotState.RETAINED
    assert book.evictions == 1


def test_a_never_fitting_reservation_is_refused_without_evicting() -> None:
    book, sim = _fresh(capacity=40)
    cached = _run(book, sim, [1, 2, 3], 3)
    book.finish(cached)
    assert book.shortfall([5, 6, 7], 41) == 1
    assert book.admit([5, 6, 7], 41) is None
    assert cached.state is SlotState.RETAINED and book.evictions == 0


def test_finish_keeps_one_entry_per_prefix_chain_and_at_most_max_retained() -> None:
    book, sim = _fresh(capacity=60, n_slots=5, max_retained=2)
    short = _run(book, sim, [1, 2, 3], 3)
    book.finish(short)
    long = _run(book, sim, [1, 2, 3, 4, 5], 5)  # forks `short`; on finishing it supersedes it
    book.finish(long)
    assert short.state is SlotState.FREE and long.state is SlotState.RETAINED
    again = _run(book, sim, [1, 2, 3, 4], 4)  # everything it holds is in `long` already: not kept
    book.finish(again)
    assert again.state is SlotState.FREE
    for first in (7, 8, 9):
        s = _run(book, sim, [first, 1], 2)
        book.finish(s)
    assert len(book.in_state(SlotState.RETAINED)) == 2
    book.check()
    sim.check(book)


def test_growing_past_a_reservation_or_a_finished_slot_is_an_error() -> None:
    book, sim = _fresh()
    s = _run(book, sim, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="reservation"):
        book.grow(s, [7, 8])
    book.finish(s, retain=False)
    with pytest.raises(ValueError, match="not active"):
        book.grow(s, [7])
    with pytest.raises(ValueError, match="cannot hold"):
        book.admit([1, 2, 3], 2)


# ------------------------------------------------------------------------------------------ the real cache


class LlamaCache:
    """The same checks against llama.cpp: each sequence's positions from `llama_memory_seq_pos_min/max`,
    and the number of used cells by probing: a scratch sequence must take exactly the free cells."""

    def __init__(self, rt: LlamaRuntime, scratch_seq: int) -> None:
        self.rt = rt
        self.scratch = scratch_seq
        self._probed: tuple[int, ...] = ()

    def decode(self, seq: int, tokens: list[int], start: int) -> bool:
        wants = [i == len(tokens) - 1 for i in range(len(tokens))]
        positions = list(range(start, start + len(tokens)))
        rc = self.rt.decode(tokens, positions, [seq] * len(tokens), wants)
        assert rc in (0, 1), rc
        return rc == 0

    def _fits(self, n: int) -> bool:
        ok = self.decode(self.scratch, [100 + i % 50 for i in range(n)], 0)
        self.rt.seq_rm(self.scratch, -1, -1)
        return ok

    def check(self, book: KvCells) -> None:
        for s in book.slots:
            expect = (0, len(s.tokens) - 1) if s.tokens else (-1, -1)
            assert self.rt.seq_pos_range(s.seq) == expect, f"sequence {s.seq}"
        shape = (book.used, *(len(s.tokens) for s in book.slots))
        if shape == self._probed:  # nothing changed since the last probe (each costs a prompt's decode)
            return
        self._probed = shape
        free = book.capacity - book.used
        if free:
            assert self._fits(free), f"llama.cpp has fewer than the {free} free cells the book counts"
        if 0 < free < book.capacity:
            assert not self._fits(free + 1), f"llama.cpp has more than the {free} free cells the book counts"


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaRuntime]:
    rt = LlamaRuntime(packaged_model_path(), ContextParams(n_ctx=256, n_batch=256, n_seq=6, threads=1, flash_attn=-1))
    yield rt
    rt.close()


# Fork, refusal while running work holds the cells, eviction of both cache entries, then the rest.
S0, S2 = STEMS[0], STEMS[2]
SCENARIO: list[Op] = [
    *[("admit", S0, 100), ("grow", 0, 52), ("finish", 0, True)],
    *[("admit", [*S0[:10], 55], 100), ("grow", 0, 51)],
    ("admit", S2, 200),  # 61 held + 50 reserved by the running request + 205 > 256: refused
    ("finish", 0, True),
    ("admit", S2, 200),  # fits only after evicting both retained entries
    *[("grow", 0, 100), ("admit", [60, 61], 40), ("grow", 1, 42), ("evict",)],
    *[("finish", 0, False), ("finish", 0, True), ("clear",)],
]


def test_the_scenario_on_the_simulated_cache() -> None:
    sim = SimCache(256)
    book = _book(sim.seq_cp, sim.seq_rm, 256, 5, 2)
    run_program(SCENARIO, book, sim)
    assert book.evictions == 2 and book.used == 0


@pytest.mark.slow
def test_the_scenario_matches_llama_cpp(llama: LlamaRuntime) -> None:
    llama.clear_memory()
    assert llama.n_ctx == 256
    book = _book(llama.seq_cp, llama.seq_rm, llama.n_ctx, 5, 2)
    run_program(SCENARIO, book, LlamaCache(llama, scratch_seq=5))
    assert book.evictions == 2 and book.used == 0


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=st.lists(ops, min_size=15, max_size=30))
def test_random_programs_match_llama_cpp(llama: LlamaRuntime, program: list[Op]) -> None:
    llama.clear_memory()
    book = _book(llama.seq_cp, llama.seq_rm, llama.n_ctx, 5, 2)
    # Reservations and growth scaled up, so that admission and eviction decisions happen in a 256-cell cache.
    scaled = [(o[0], o[1], o[2] * 8) if o[0] in ("admit", "grow") else o for o in program]
    run_program(scaled, book, LlamaCache(llama, scratch_seq=5))
