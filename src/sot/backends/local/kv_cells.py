"""KV-cell bookkeeping for a unified llama.cpp cache: sequence slots, shared prefixes, reservations, LRU eviction.

llama.cpp has no public "used cells" call, but its unified cache behaves exactly like the model kept here: a
decoded token gets a fresh cell, `seq_cp` adds a sequence tag to existing cells, `seq_rm` removes the tag and
frees the cell when no tag is left. Keeping the model lets the scheduler admit work by free cells instead of
finding out from a failed `llama_decode`. The module calls llama.cpp only through the two functions it is
given, so it is tested against a simulated cache without a model.

Terms. A *slot* is one llama.cpp sequence id and the tokens whose KV it holds (positions 0..len-1). An
*active* slot belongs to a running request and has a *reservation*: the number of cells it may grow to. A
*retained* slot is a finished sequence kept as prefix cache; it is evictable (least recently used first). A
cell is *pinned* while an active slot tags it. The invariant the scheduler relies on, kept by `admit`:

    used cells + cells still reserved by active slots <= capacity

so every admitted request can decode to its reservation without running out of cells.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

SeqCp = Callable[[int, int, int, int], object]
"""`seq_cp(src, dst, p0, p1)`: tag the cells of sequence `src` at positions [p0, p1) with sequence `dst`."""
SeqRm = Callable[[int, int, int], object]
"""`seq_rm(seq, p0, p1)`: remove sequence `seq`'s tag from its cells at [p0, p1); -1, -1 means all of them."""


class SlotState(enum.Enum):
    """What a slot is used for."""

    FREE = "free"
    ACTIVE = "active"  # a running request's sequence
    RETAINED = "retained"  # a finished sequence kept as prefix cache


@dataclass(eq=False, slots=True)
class Slot:
    """One llama.cpp sequence id and the tokens (and model cells) whose KV it holds, position by position."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    state: SlotState = SlotState.FREE
    reserve: int = 0  # (active) the number of cells this sequence may grow to
    last_used: int = 0

    @property
    def outstanding(self) -> int:
        """Cells reserved for this sequence that it does not hold yet (0 unless active)."""
        if self.state is not SlotState.ACTIVE:
            return 0
        return max(0, self.reserve - len(self.cells))


def common_prefix(a: np.ndarray, b: Sequence[int]) -> int:
    """How many leading tokens `a` (an int32 array) and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=a.dtype))
    return int(diff[0]) if diff.size else n


class KvCells:
    """The slots of one llama.cpp context and a model of its unified cache's cells.

    Every change to llama.cpp's cache that is not a decode goes through here (`seq_cp`, `seq_rm`); decoded
    tokens are recorded with `grow` after `llama_decode` succeeded.
    """

    def __init__(self, *, capacity: int, n_slots: int, max_retained: int, seq_cp: SeqCp, seq_rm: SeqRm) -> None:
        if capacity < 1 or n_slots < 1 or max_retained < 0:
            raise ValueError(f"bad cache shape: capacity={capacity}, n_slots={n_slots}, max_retained={max_retained}")
        self.capacity = capacity
        self.max_retained = max_retained
        self.slots = [Slot(seq=i) for i in range(n_slots)]
        self.evictions = 0  # retained sequences freed to make room (not counting the retention limit)
        self._seq_cp = seq_cp
        self._seq_rm = seq_rm
        self._ref: dict[int, int] = {}  # cell -> sequences tagging it
        self._pin: dict[int, int] = {}  # cell -> active sequences tagging it
        self._ids = itertools.count()
        self._tick = 0

    # ------------------------------------------------------------------------------------ queries
    @property
    def used(self) -> int:
        """Cells holding KV (a cell shared by several sequences counts once)."""
        return len(self._ref)

    @property
    def pinned(self) -> int:
        """Cells that some active sequence holds: no eviction frees them."""
        return len(self._pin)

    @property
    def reserved(self) -> int:
        """Cells promised to active sequences that they do not hold yet."""
        return sum(s.outstanding for s in self.slots)

    @property
    def headroom(self) -> int:
        """Cells neither used nor promised to an active sequence."""
        return self.capacity - self.used - self.reserved

    def in_state(self, state: SlotState) -> list[Slot]:
        return [s for s in self.slots if s.state is state]

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[Slot | None, int]:
        """The slot whose KV holds the longest prefix of `tokens`, and that prefix's length."""
        prompt = np.asarray(tokens, dtype=np.int32)
        best, best_len = None, 0
        for s in self.slots:
            if s.tokens:
                n = common_prefix(prompt, s.tokens)
                if n > best_len:
                    best, best_len = s, n
        return best, best_len

    def shortfall(self, tokens: Sequence[int], reserve: int) -> int:
        """Cells missing to admit a sequence for `tokens` that may grow to `reserve` cells, even after evicting
        every retained sequence (0 when it fits now). Running work is never counted as evictable."""
        return self._shortfall(*self._fork_source(tokens), reserve)

    def _shortfall(self, src: Slot | None, n: int, reserve: int) -> int:
        newly_pinned = sum(1 for c in src.cells[:n] if c not in self._pin) if src is not None else 0
        return max(0, self.pinned + newly_pinned + self.reserved + (reserve - n) - self.capacity)

    # ------------------------------------------------------------------------------------ changes
    def admit(self, tokens: Sequence[int], reserve: int) -> Slot | None:
        """Start an active sequence for the prompt `tokens` that may grow to `reserve` cells.

        The longest cached prefix of `tokens` is forked into it (tags only, nothing is copied), leaving at
        least one token to compute; least recently used retained sequences are evicted as far as needed to
        keep the reservation invariant. Returns None, changing nothing, when no slot is free or the cells
        are not there even after evicting every retained sequence.
        """
        if reserve < len(tokens):
            raise ValueError(f"a reservation of {reserve} cells cannot hold a {len(tokens)}-token prompt")
        slot = next((s for s in self.slots if s.state is SlotState.FREE), None)
        if slot is None:
            return None
        src, n = self._fork_source(tokens)
        if self._shortfall(src, n, reserve):
            return None
        slot.state = SlotState.ACTIVE
        slot.reserve = reserve
        if src is not None and n > 0:
            self._seq_cp(src.seq, slot.seq, 0, n)
            slot.tokens = list(tokens[:n])
            slot.cells = src.cells[:n]
            self._share_pinned(slot.cells)
            if src.state is SlotState.RETAINED:
                self.touch(src)
        self._evict_until_reserved_fits()
        return slot

    def grow(self, slot: Slot, tokens: Sequence[int]) -> None:
        """Record that `tokens` were decoded into active `slot` (each got a fresh cell)."""
        if slot.state is not SlotState.ACTIVE:
            raise ValueError(f"sequence {slot.seq} is {slot.state.value}, not active")
        if len(slot.cells) + len(tokens) > slot.reserve:
            raise ValueError(f"sequence {slot.seq} would grow past its reservation of {slot.reserve} cells")
        cells = [next(self._ids) for _ in tokens]
        for c in cells:
            self._ref[c] = 1
            self._pin[c] = 1
        slot.tokens.extend(tokens)
        slot.cells.extend(cells)

    def finish(self, slot: Slot, *, retain: bool = True) -> None:
        """An active sequence is done: keep it as prefix cache (bounded, LRU) or free it.

        It is freed when `retain` is false, when it is empty, when no cache is kept, or when a retained
        sequence already starts with all its tokens. Retained sequences whose tokens are a prefix of it are
        freed: it serves every request they could.
        """
        if slot.state is not SlotState.ACTIVE:
            raise ValueError(f"sequence {slot.seq} is {slot.state.value}, not active")
        if not retain or not slot.tokens or self.max_retained == 0 or self._covered(slot):
            self.free(slot)
            return
        self._untag_pins(slot.cells)
        slot.state = SlotState.RETAINED
        slot.reserve = 0
        for other in self.in_state(SlotState.RETAINED):
            if other is not slot and _starts_with(slot.tokens, other.tokens):
                self.free(other)
        self.touch(slot)
        retained = self.in_state(SlotState.RETAINED)
        while len(retained) > self.max_retained:
            lru = min(retained, key=lambda s: s.last_used)
            self.free(lru)
            retained.remove(lru)

    def free(self, slot: Slot) -> None:
        """Drop a sequence from llama.cpp's cache and release its cells."""
        if slot.state is SlotState.FREE and not slot.cells:
            return
        self._seq_rm(slot.seq, -1, -1)
        if slot.state is SlotState.ACTIVE:
            self._untag_pins(slot.cells)
        for c in slot.cells:
            n = self._ref[c] - 1
            if n:
                self._ref[c] = n
            else:
                del self._ref[c]
        slot.tokens, slot.cells = [], []
        slot.state = SlotState.FREE
        slot.reserve = 0

    def evict_lru(self) -> bool:
        """Free the least recently used retained sequence; False when there is none."""
        retained = self.in_state(SlotState.RETAINED)
        if not retained:
            return False
        self.free(min(retained, key=lambda s: s.last_used))
        self.evictions += 1
        return True

    def clear_retained(self) -> None:
        """Free every retained sequence."""
        for s in self.in_state(SlotState.RETAINED):
            self.free(s)

    def reset(self) -> None:
        """Forget everything, after the caller cleared llama.cpp's cache itself (no `seq_rm` calls)."""
        for s in self.slots:
            s.tokens, s.cells, s.state, s.reserve = [], [], SlotState.FREE, 0
        self._ref.clear()
        self._pin.clear()

    def touch(self, slot: Slot) -> None:
        """Mark `slot` as just used (for LRU eviction)."""
        self._tick += 1
        slot.last_used = self._tick

    def check(self) -> None:
        """Recount everything from the slots; raise RuntimeError on the first disagreement (for tests)."""
        ref: dict[int, int] = {}
        pin: dict[int, int] = {}
        for s in self.slots:
            if len(s.tokens) != len(s.cells) or len(set(s.cells)) != len(s.cells):
                raise RuntimeError(f"sequence {s.seq}: {len(s.tokens)} tokens but {len(s.cells)} cells")
            if s.state is SlotState.FREE and s.cells:
                raise RuntimeError(f"free sequence {s.seq} holds {len(s.cells)} cells")
            for c in s.cells:
                ref[c] = ref.get(c, 0) + 1
                if s.state is SlotState.ACTIVE:
                    pin[c] = pin.get(c, 0) + 1
        if ref != self._ref or pin != self._pin:
            raise RuntimeError("cell reference counts disagree with the slots")
        if len(self.in_state(SlotState.RETAINED)) > self.max_retained:
            raise RuntimeError("more retained sequences than allowed")
        if self.used + self.reserved > self.capacity:
            raise RuntimeError(f"{self.used} used + {self.reserved} reserved cells > capacity {self.capacity}")

    # ------------------------------------------------------------------------------------ internals
    def _fork_source(self, tokens: Sequence[int]) -> tuple[Slot | None, int]:
        src, n = self.longest_prefix(tokens)
        # Leave at least one prompt token to decode: its logits give the first generated token.
        return src, max(0, min(n, len(tokens) - 1))

    def _covered(self, slot: Slot) -> bool:
        """Whether a retained sequence already starts with all of `slot`'s tokens."""
        return any(o is not slot and _starts_with(o.tokens, slot.tokens) for o in self.in_state(SlotState.RETAINED))

    def _evict_until_reserved_fits(self) -> None:
        while self.used + self.reserved > self.capacity and self.evict_lru():
            pass

    def _share_pinned(self, cells: list[int]) -> None:
        ref, pins = self._ref, self._pin
        for c in cells:
            ref[c] += 1
            pins[c] = pins.get(c, 0) + 1

    def _untag_pins(self, cells: list[int]) -> None:
        pins = self._pin
        for c in cells:
            n = pins[c] - 1
            if n:
                pins[c] = n
            else:
                del pins[c]


def _starts_with(tokens: list[int], prefix: list[int]) -> bool:
    return len(prefix) <= len(tokens) and tokens[: len(prefix)] == prefix
