"""The batching engine: one worker thread owns a llama.cpp context and decodes all live requests together.

Continuous batching (requests join and leave between steps) with an automatic shared-prefix cache over a
unified KV cache: a new request forks the longest matching prefix of any cached or running sequence with
`llama_memory_seq_cp` instead of recomputing it. It does no chat rendering policy and no SoT logic: it
receives requests, streams tokens back to asyncio queues, and accounts for what it did.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sot.backends.base import Chunk, FinishReason, GenerationRequest, Usage
from sot.backends.local.chat_template import ChatTemplate, template_for_model
from sot.backends.local.sampling import REPEAT_WINDOW, Sampler
from sot.backends.local.text_stream import TextStream
from sot.backends.local.threads import ThreadAdvisor
from sot.errors import BackendError, BadRequestError, ConfigError, SoTError

log = logging.getLogger(__name__)

BACKEND_NAME = "local"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build the llama.cpp context; fixed for the engine's lifetime."""

    n_ctx: int = 8192
    n_threads: int | None = None
    max_sequences: int = 16  # concurrently generating requests
    max_retained: int = 4  # finished sequences kept as prefix cache (LRU)
    n_batch: int = 512  # tokens per llama_decode call (prompt chunks + one per running sequence)
    # -1 auto, 0 off, 1 on. Auto picks flash attention on CPU in this llama.cpp; measured no worse.
    flash_attn: int = -1


# ---------------------------------------------------------------------------------------------------------
# llama.cpp logging: routed to Python logging. The callback object must stay referenced for the process
# lifetime (a collected ctypes callback crashes the process on the next log line).
# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last).
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_log_callback: Any = None
_log_last_level = logging.DEBUG
_llama_log = logging.getLogger("sot.backends.local.llama_cpp")


def _install_log_callback() -> None:
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        global _log_last_level
        lvl = _log_last_level if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
        _log_last_level = lvl
        if _llama_log.isEnabledFor(lvl):
            _llama_log.log(lvl, "%s", text.decode("utf-8", errors="replace").rstrip("\n"))

    _log_callback = llama_cpp.llama_log_callback(_cb)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


# ---------------------------------------------------------------------------------------------------------
class _CellBook:
    """A model of the unified KV cache's cells: which cells exist and how many sequences tag each.

    llama.cpp has no public "used cells" call, but its unified cache behaves exactly like this: a decoded
    token gets a fresh cell, `seq_cp` adds a sequence tag to existing cells, `seq_rm` removes the tag and
    frees the cell when no tag is left. Keeping the model lets us plan evictions before decode fails.
    """

    __slots__ = ("_ids", "_ref")

    def __init__(self) -> None:
        self._ref: dict[int, int] = {}
        self._ids = itertools.count()

    def new(self, n: int) -> list[int]:
        ids = [next(self._ids) for _ in range(n)]
        for i in ids:
            self._ref[i] = 1
        return ids

    def share(self, cells: list[int]) -> None:
        ref = self._ref
        for c in cells:
            ref[c] += 1

    def release(self, cells: list[int]) -> None:
        ref = self._ref
        for c in cells:
            n = ref[c] - 1
            if n:
                ref[c] = n
            else:
                del ref[c]

    def used(self) -> int:
        return len(self._ref)

    def clear(self) -> None:
        self._ref.clear()


@dataclass(eq=False, slots=True)
class _Request:
    """One stream's state; the fields below `sink` belong to the worker thread."""

    id: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[Chunk | BaseException]
    ignore_eos: bool = False
    # worker-side state
    prompt: list[int] = field(default_factory=list)
    prompt_done: int = 0  # prompt tokens whose KV is in this request's sequence
    reused: int = 0  # of which copied from the prefix cache
    slot: _Slot | None = None
    sampler: Sampler | None = None
    text: TextStream | None = None
    next_token: int | None = None  # sampled, not yet decoded
    completion_tokens: int = 0
    admitted_step: int = 0
    closed: bool = False  # the final chunk or an error was delivered, or the consumer went away


@dataclass(eq=False, slots=True)
class _Slot:
    """One llama.cpp sequence id and the tokens whose KV it holds (positions 0..len-1)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    request: _Request | None = None  # set while active
    retained: bool = False  # finished, kept as prefix cache
    last_used: int = 0


@dataclass(slots=True)
class _Call:
    fn: Callable[[], object]
    future: concurrent.futures.Future[object]


_STOP = object()

# A request waits for a running one to compute their shared prefix only when that saves at least this many
# prompt tokens: waiting costs it one step of latency.
_MIN_SHARED_TO_WAIT = 8


def _common_prefix(a: np.ndarray, b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != np.asarray(b[:n], dtype=a.dtype))
    return int(diff[0]) if diff.size else n


class Engine:
    """The worker thread and everything it owns. Public methods are thread-safe."""

    def __init__(
        self,
        model_file: Callable[[], Path],
        config: EngineConfig,
    ) -> None:
        # `model_file` runs on the worker thread (it may re-encode weights), keeping the event loop free.
        self._model_file = model_file
        self.config = config
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._cells_used = 0
        self.model_path: Path | None = None
        # worker-owned
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._slots: list[_Slot] = []
        self._book = _CellBook()
        self._tick = 0
        self._step_no = 0
        self._pieces: dict[int, bytes] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Chunk | BaseException]]] = {}
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._vocab: Any = None
        self._batch: Any = None
        self._n_vocab = 0
        self._n_ctx = 0
        self._template: ChatTemplate | None = None
        self._bos: int | None = None
        self._max_active = 0
        self._max_retained = 0
        self._advisor: ThreadAdvisor | None = None
        self._threads = 0

    # ---------------------------------------------------------------- thread-safe API
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sot-local-engine", daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raise what loading raised."""
        self.start()
        if not self._ready.wait(timeout):
            raise BackendError("the local model did not finish loading in time", backend=BACKEND_NAME)
        if self._load_error is not None:
            raise self._load_error

    def submit(self, request: GenerationRequest, *, ignore_eos: bool = False) -> _Request:
        """Queue a request; its chunks (or one exception) arrive on `handle.sink` in the caller's loop."""
        self.start()
        handle = _Request(
            id=next(self._ids),
            request=request,
            loop=asyncio.get_running_loop(),
            sink=asyncio.Queue(),
            ignore_eos=ignore_eos,
        )
        self._inbox.put(handle)
        return handle

    def cancel(self, handle: _Request) -> None:
        """Drop a request at the next step (its consumer went away)."""
        self._inbox.put(("cancel", handle))

    def call(self, fn: Callable[[], object], timeout: float | None = 60.0) -> object:
        """Run `fn` on the worker thread between steps and return its result."""
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._inbox.put(_Call(fn, fut))
        return fut.result(timeout)

    def stop(self) -> None:
        self._inbox.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def counters(self) -> dict[str, float]:
        with self._stats_lock:
            out = {k: float(v) for k, v in self._stats.items()}
        for key in (
            "requests",
            "prompt_tokens",
            "prompt_tokens_computed",
            "prompt_tokens_reused",
            "decode_steps",
            "decoded_tokens",
            "batch_tokens",
            "generated_tokens",
            "busy_seconds",
        ):
            out.setdefault(key, 0.0)
        return out

    def kv_cells_used(self) -> int:
        return self._cells_used

    # ---------------------------------------------------------------- worker: lifecycle
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # loading failed: every request gets the reason
            self._load_error = (
                exc
                if isinstance(exc, SoTError)
                else BackendError(f"loading the local model failed: {exc}", backend=BACKEND_NAME)
            )
            self._ready.set()
            self._serve_load_error()
            return
        self._stats["threads"] = self._threads
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _serve_load_error(self) -> None:
        assert self._load_error is not None
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if isinstance(item, _Request):
                self._deliver(item, _as_backend_error(self._load_error))
                self._flush()
            elif isinstance(item, _Call):
                item.future.set_result(None)

    def _load(self) -> None:
        import llama_cpp as ll

        _install_log_callback()
        ll.llama_backend_init()
        path = self._model_file()
        self.model_path = path
        cfg = self.config
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ConfigError(f"llama.cpp could not load the GGUF model {path}")
        self._model = model
        n_seq = cfg.max_sequences + cfg.max_retained
        n_seq = min(n_seq, int(ll.llama_max_parallel_sequences()))
        if n_seq < 2:
            raise ConfigError("max_sequences must be at least 1")
        # An explicit thread count is obeyed; otherwise it follows the cores other processes leave free.
        self._advisor = None if cfg.n_threads else ThreadAdvisor(_usable_cores())
        threads = cfg.n_threads or (self._advisor.measure_now() if self._advisor else 1)
        self._threads = threads
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cfg.n_ctx
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One cell pool for all sequences: seq_cp then only tags cells (no copy) and any sequence may use
        # the whole context, which is what a shared-prefix fork needs.
        cparams.kv_unified = True
        cparams.flash_attn_type = cfg.flash_attn
        cparams.no_perf = True
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise ConfigError(f"llama.cpp could not create a context (n_ctx={cfg.n_ctx}, n_seq_max={n_seq})")
        self._ctx = ctx
        self._mem = ll.llama_get_memory(ctx)
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self._n_ctx = int(ll.llama_n_ctx(ctx))
        self._batch = ll.llama_batch_init(cfg.n_batch, 0, 1)
        self._slots = [_Slot(seq=i) for i in range(n_seq)]
        self._max_active = min(cfg.max_sequences, n_seq - 1)
        self._max_retained = max(0, n_seq - self._max_active)
        raw = ll.llama_model_chat_template(model, None)
        self._bos = int(ll.llama_vocab_bos(self._vocab)) if ll.llama_vocab_get_add_bos(self._vocab) else None
        eos = int(ll.llama_vocab_eos(self._vocab))
        bos_text = self._piece(self._bos, special=True).decode() if self._bos is not None else ""
        eos_text = self._piece(eos, special=True).decode() if eos >= 0 else ""
        self._warm_up()
        self._template = template_for_model(
            raw.decode("utf-8", errors="replace") if raw else None, bos_token=bos_text, eos_token=eos_text
        )

    def _warm_up(self) -> None:
        """One small prompt and two decode steps, so the first real request does not pay graph setup."""
        import llama_cpp as ll

        b = self._batch
        n = 16
        for step, (first, count) in enumerate(((0, n), (n, 1), (n + 1, 1))):
            for i in range(count):  # token ids do not matter; sequence 0 is wiped afterwards
                b.token[i] = 1 + first + i
                b.pos[i] = first + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = int(i == count - 1)
            b.n_tokens = count
            if ll.llama_decode(self._ctx, b) != 0:
                raise BackendError(f"warm-up decode {step} failed", backend=BACKEND_NAME)
        ll.llama_memory_seq_rm(self._mem, 0, -1, -1)

    def _shutdown(self) -> None:
        import llama_cpp as ll

        closed = BackendError("the local backend was closed", backend=BACKEND_NAME)
        for req in [*self._active, *self._waiting]:
            self._deliver(req, closed)
        self._active.clear()
        self._waiting.clear()
        while True:  # answer anything still queued so no caller waits forever
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                self._deliver(item, closed)
            elif isinstance(item, _Call):
                item.future.set_exception(closed)
        self._flush()
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None
        self._cells_used = 0

    def _loop(self) -> None:
        while True:
            items: list[object] = []
            if not self._active and not self._waiting:
                items.append(self._inbox.get())  # idle: sleep until something arrives
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _STOP:
                    return
                self._handle(item)
            self._cells_used = self._book.used()
            if self._active or self._waiting:
                try:
                    self._step()
                except Exception as exc:
                    log.exception("local engine step failed")
                    self._fail_everything(exc)
            self._flush()

    def _handle(self, item: object) -> None:
        if isinstance(item, _Request):
            self._waiting.append(item)
        elif isinstance(item, tuple) and item[0] == "cancel":
            req = item[1]
            assert isinstance(req, _Request)
            if not req.closed:
                req.closed = True
                self._bump("cancelled")
            if req in self._waiting:
                self._waiting.remove(req)
            elif req.slot is not None:
                self._release(req)
        elif isinstance(item, _Call):
            try:
                item.future.set_result(item.fn())
            except Exception as exc:
                item.future.set_exception(exc)

    # ---------------------------------------------------------------- worker: one step
    def _step(self) -> None:
        t0 = time.perf_counter()
        self._step_no += 1
        self._adjust_threads()
        self._admit()
        if self._active:
            self._decode_once()
        with self._stats_lock:
            self._stats["busy_seconds"] += time.perf_counter() - t0
        self._cells_used = self._book.used()

    def _admit(self) -> None:
        deferred: list[_Request] = []
        while self._waiting and len(self._active) < self._max_active:
            req = self._waiting.popleft()
            if req.closed:
                continue
            try:
                self._prepare(req)
            except SoTError as exc:
                self._deliver(req, exc if isinstance(exc, BackendError) else _as_backend_error(exc))
                continue
            if self._prefix_in_flight(req):
                deferred.append(req)
                continue
            slot = next(s for s in self._slots if s.request is None and not s.retained and not s.tokens)
            self._fork_prefix(req, slot)
            slot.request = req
            req.slot = slot
            req.admitted_step = self._step_no
            self._active.append(req)
        self._waiting.extendleft(reversed(deferred))  # back at the front, in arrival order

    def _prefix_in_flight(self, req: _Request) -> bool:
        """Whether `req` should wait a step for a running request that is computing a longer shared prefix.

        SoT's point requests arrive together and share everything up to their last few tokens. Admitted
        together, each would compute the shared part that no cache holds yet; the first one computes it
        while the others wait one step and then fork it, so the shared part is computed once.
        """
        leaders = [r for r in self._active if r.slot is not None and r.prompt_done < len(r.prompt)]
        if not leaders:
            return False
        _slot, cached = self._longest_cached_prefix(req.prompt)
        prompt = np.asarray(req.prompt, dtype=np.int32)
        pending = max(_common_prefix(prompt, r.prompt) for r in leaders)
        return min(pending, len(req.prompt) - 1) >= cached + _MIN_SHARED_TO_WAIT

    def _longest_cached_prefix(self, prompt_tokens: list[int]) -> tuple[_Slot | None, int]:
        """The sequence whose KV holds the longest prefix of `prompt_tokens`, and that prefix's length."""
        prompt = np.asarray(prompt_tokens, dtype=np.int32)
        best, best_len = None, 0
        for s in self._slots:
            if s.tokens:
                n = _common_prefix(prompt, s.tokens)
                if n > best_len:
                    best, best_len = s, n
        return best, best_len

    def _prepare(self, req: _Request) -> None:
        if req.text is not None:  # prepared on an earlier step, then deferred
            return
        r = req.request
        if r.sampling.max_tokens < 1:
            raise BadRequestError("max_tokens must be at least 1", status_code=400, backend=BACKEND_NAME)
        assert self._template is not None
        try:
            text = self._template.render(r.messages, r.prefill)
        except ConfigError as exc:
            raise BadRequestError(str(exc), status_code=400, backend=BACKEND_NAME) from exc
        prompt = self._tokenize(text)
        if self._bos is not None and (not prompt or prompt[0] != self._bos):
            prompt.insert(0, self._bos)
        if not prompt:
            raise BadRequestError("the rendered prompt is empty", status_code=400, backend=BACKEND_NAME)
        if len(prompt) >= self._n_ctx:
            raise BadRequestError(
                f"the prompt has {len(prompt)} tokens; the local context holds {self._n_ctx}",
                status_code=400,
                backend=BACKEND_NAME,
            )
        req.prompt = prompt
        req.sampler = Sampler(r.sampling)
        req.text = TextStream(r.stop)

    def _fork_prefix(self, req: _Request, slot: _Slot) -> None:
        """Copy the longest cached prefix of `req`'s prompt into `slot` (KV cells are shared, not copied)."""
        import llama_cpp as ll

        best, best_len = self._longest_cached_prefix(req.prompt)  # `slot` is empty: never its own source
        # Leave at least one prompt token to decode: its logits give the first generated token.
        best_len = min(best_len, len(req.prompt) - 1)
        if best is not None and best_len > 0:
            ll.llama_memory_seq_cp(self._mem, best.seq, slot.seq, 0, best_len)
            slot.tokens = req.prompt[:best_len]
            slot.cells = best.cells[:best_len]
            self._book.share(slot.cells)
            if best.retained:
                self._touch(best)
        req.prompt_done = req.reused = best_len
        with self._stats_lock:
            self._stats["requests"] += 1
            self._stats["prompt_tokens"] += len(req.prompt)
            self._stats["prompt_tokens_reused"] += best_len
            self._stats["prompt_tokens_computed"] += len(req.prompt) - best_len

    def _plan(self) -> list[tuple[_Request, int, int, bool]]:
        """This step's batch: (request, token, position, wants logits); running sequences first."""
        entries: list[tuple[_Request, int, int, bool]] = []
        for req in self._active:
            if req.next_token is not None:
                assert req.slot is not None
                entries.append((req, req.next_token, len(req.slot.tokens), True))
        budget = self.config.n_batch - len(entries)
        for req in self._active:
            if budget <= 0:
                break
            if req.next_token is None and req.prompt_done < len(req.prompt):
                take = min(budget, len(req.prompt) - req.prompt_done)
                start = req.prompt_done
                for j in range(start, start + take):
                    entries.append((req, req.prompt[j], j, j == len(req.prompt) - 1))
                budget -= take
        return entries

    def _decode_once(self) -> None:
        for _attempt in range(self._n_ctx + 8):
            entries = self._plan()
            if not entries:
                return
            if self._book.used() + len(entries) > self._n_ctx and self._make_room():
                continue
            rc = self._run_batch(entries)
            if rc == 0:
                break
            if rc == 1 and self._make_room():  # no KV slot although the model said there was room
                continue
            raise BackendError(f"llama_decode failed (rc={rc})", backend=BACKEND_NAME)
        else:  # pragma: no cover - every retry frees cells, so this cannot loop for long
            raise BackendError("could not find room in the KV cache", backend=BACKEND_NAME)

        self._bump_many(
            decode_steps=1,
            batch_tokens=len(entries),
            decoded_tokens=sum(1 for e in entries if e[0].next_token is not None),
        )
        n_seqs = len({e[0].id for e in entries})
        self._bump(f"batch_size.{n_seqs}")

        # Commit the decoded tokens to their sequences before sampling (the penalty window reads them).
        for req, token, _pos, _want in entries:
            slot = req.slot
            assert slot is not None
            slot.tokens.append(token)
            if req.next_token is None:
                req.prompt_done += 1
        new_cells = self._book.new(len(entries))
        for (req, _tok, _pos, _want), cell in zip(entries, new_cells, strict=True):
            assert req.slot is not None
            req.slot.cells.append(cell)
        for i, (req, _tok, _pos, want) in enumerate(entries):
            if not want or req.closed:
                continue
            req.next_token = None
            try:
                self._after_logits(req, i)
            except Exception as exc:  # one request's failure must not take the batch down
                log.exception("local engine: request %d failed", req.id)
                self._deliver(req, _as_backend_error(exc))
                self._release(req)

    def _run_batch(self, entries: list[tuple[_Request, int, int, bool]]) -> int:
        import llama_cpp as ll

        b = self._batch
        for i, (req, token, pos, want) in enumerate(entries):
            assert req.slot is not None
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = req.slot.seq
            b.logits[i] = 1 if want else 0
        b.n_tokens = len(entries)
        return int(ll.llama_decode(self._ctx, b))

    def _adjust_threads(self) -> None:
        if self._advisor is None:
            return
        want = self._advisor.update()
        if want is not None and want != self._threads:
            import llama_cpp as ll

            log.debug("threads %d -> %d (others use %.2f cores)", self._threads, want, self._advisor.others)
            ll.llama_set_n_threads(self._ctx, want, want)
            self._threads = want
            with self._stats_lock:
                self._stats["threads"] = want
                self._stats["thread_changes"] += 1

    def _make_room(self) -> bool:
        """Free KV cells: the least recently used retained sequence first, else end the longest-running
        request with "length". False when there is nothing left to free."""
        retained = [s for s in self._slots if s.retained]
        if retained:
            self._free_slot(min(retained, key=lambda s: s.last_used))
            self._bump("evictions")
            return True
        if not self._active:
            return False
        victim = max(self._active, key=lambda r: (r.completion_tokens, -r.admitted_step))
        self._bump("context_full_finishes")
        self._finish(victim, "length")
        return True

    def _sample(self, req: _Request, logits: np.ndarray) -> int:
        assert req.sampler is not None and req.slot is not None
        return req.sampler.sample(logits, req.slot.tokens[-REPEAT_WINDOW:])

    def _after_logits(self, req: _Request, batch_index: int) -> None:
        import llama_cpp as ll

        assert req.slot is not None and req.text is not None
        ptr = ll.llama_get_logits_ith(self._ctx, batch_index)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()
        token = self._sample(req, logits)
        if not req.ignore_eos and ll.llama_vocab_is_eog(self._vocab, token):
            self._finish(req, "stop")
            return
        req.completion_tokens += 1
        self._bump("generated_tokens")
        text = req.text.push(self._piece(token))
        if req.text.stopped:
            self._emit(req, text)
            self._finish(req, "stop")
            return
        if req.completion_tokens >= req.request.sampling.max_tokens:
            self._emit(req, text)
            self._finish(req, "length")
            return
        if len(req.slot.tokens) + 1 > self._n_ctx:  # no position left for the token just sampled
            self._emit(req, text)
            self._finish(req, "length")
            return
        self._emit(req, text)
        req.next_token = token

    # ---------------------------------------------------------------- worker: finishing and freeing
    def _finish(self, req: _Request, reason: FinishReason) -> None:
        assert req.text is not None
        tail = req.text.flush()
        usage = Usage(
            prompt_tokens=len(req.prompt),
            completion_tokens=req.completion_tokens,
            computed_prompt_tokens=len(req.prompt) - req.reused,
        )
        # Release first: by the time the consumer sees the final chunk, the engine no longer holds it.
        self._release(req)
        self._deliver(req, Chunk(text=tail, finish_reason=reason, usage=usage))

    def _release(self, req: _Request) -> None:
        """Take `req` out of the batch; its sequence becomes a retained prefix-cache entry (or is freed)."""
        if req in self._active:
            self._active.remove(req)
        slot, req.slot = req.slot, None
        req.next_token = None
        if slot is None:
            return
        slot.request = None
        if not slot.tokens or self._max_retained == 0 or self._covered(slot):
            self._free_slot(slot)
            return
        # An entry whose tokens are a prefix of this one is redundant: this one serves every request it could.
        for other in self._slots:
            if (
                other.retained
                and len(other.tokens) <= len(slot.tokens)
                and slot.tokens[: len(other.tokens)] == other.tokens
            ):
                self._free_slot(other)
        slot.retained = True
        self._touch(slot)
        retained = [s for s in self._slots if s.retained]
        while len(retained) > self._max_retained:
            lru = min(retained, key=lambda s: s.last_used)
            self._free_slot(lru)
            retained.remove(lru)

    def _covered(self, slot: _Slot) -> bool:
        """Whether another retained sequence already starts with all of `slot`'s tokens."""
        n = len(slot.tokens)
        return any(o.retained and len(o.tokens) >= n and o.tokens[:n] == slot.tokens for o in self._slots)

    def _free_slot(self, slot: _Slot) -> None:
        import llama_cpp as ll

        ll.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        self._book.release(slot.cells)
        slot.tokens = []
        slot.cells = []
        slot.retained = False
        slot.request = None

    def _touch(self, slot: _Slot) -> None:
        self._tick += 1
        slot.last_used = self._tick

    def clear_prefix_cache(self) -> None:
        """(worker) Free every retained sequence."""
        for s in self._slots:
            if s.retained:
                self._free_slot(s)

    def seq_lengths(self) -> dict[int, int]:
        """(worker) Sequence id -> positions llama.cpp holds for it, straight from the KV cache."""
        import llama_cpp as ll

        out = {}
        for s in self._slots:
            n = int(ll.llama_memory_seq_pos_max(self._mem, s.seq)) + 1
            if n:
                out[s.seq] = n
        return out

    def _fail_everything(self, exc: BaseException) -> None:
        """After a failed step the cache may be inconsistent: fail live requests and start clean."""
        import llama_cpp as ll

        err = _as_backend_error(exc)
        for req in [*self._active, *self._waiting]:
            self._deliver(req, err)
            req.slot = None
        self._active.clear()
        self._waiting.clear()
        ll.llama_memory_clear(self._mem, False)
        for s in self._slots:
            s.tokens, s.cells, s.request, s.retained = [], [], None, False
        self._book.clear()
        self._cells_used = 0
        self._bump("errors")

    # ---------------------------------------------------------------- worker: delivery and helpers
    def _emit(self, req: _Request, text: str) -> None:
        if text:
            self._deliver(req, Chunk(text=text), final=False)

    def _deliver(self, req: _Request, item: Chunk | BaseException, *, final: bool = True) -> None:
        """Queue `item` for the request's consumer; sent by `_flush` (one wake-up per event loop per step)."""
        if req.closed:
            return
        if final:
            req.closed = True
        self._outbox.setdefault(req.loop, []).append((req, item))

    def _flush(self) -> None:
        """Hand this step's chunks to their event loops: one `call_soon_threadsafe` per loop, not per chunk
        (each call writes to the loop's self-pipe and wakes it)."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read these requests
                for req, _item in items:
                    req.closed = True
                    self._inbox.put(("cancel", req))

    def _tokenize(self, text: str) -> list[int]:
        import llama_cpp as ll

        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise BackendError("tokenization failed", backend=BACKEND_NAME)
        return list(buf[:n])

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        import llama_cpp as ll

        if not special and token in self._pieces:
            return self._pieces[token]
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        piece = buf.raw[: max(n, 0)]
        if not special:
            self._pieces[token] = piece
        return piece

    def _bump(self, key: str, n: float = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _bump_many(self, **kv: float) -> None:
        with self._stats_lock:
            for k, v in kv.items():
                self._stats[k] += v


def _dispatch(items: list[tuple[_Request, Chunk | BaseException]]) -> None:
    """(event loop) Put each item on its request's queue."""
    for req, item in items:
        req.sink.put_nowait(item)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _as_backend_error(exc: BaseException) -> BackendError:
    """What a stream raises: BackendErrors as they are, anything else wrapped (the original as cause)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, SoTError):  # e.g. a ConfigError from loading: keep its words
        err = BackendError(str(exc), backend=BACKEND_NAME)
    else:
        err = BackendError(f"local engine error: {type(exc).__name__}: {exc}", backend=BACKEND_NAME)
    err.__cause__ = exc
    return err
