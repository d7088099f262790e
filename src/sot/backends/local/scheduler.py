"""The batching scheduler: one worker thread owns a llama.cpp context and decodes all live requests together.

Continuous batching (requests join and leave between steps) with an automatic shared-prefix cache over a
unified KV cache: a new request forks the longest matching prefix of any cached or running sequence with
`llama_memory_seq_cp` instead of recomputing it. Admission is by free KV cells: a request is started only
when the cache can hold its prompt and every token it may generate, on top of what running requests hold
and may still need; finished sequences kept as prefix cache are evicted (least recently used first) to make
that room. A request that does not fit waits, first come first served; one that never can, or that waited
past `SchedulerConfig.admission_wait`, gets `BackendCapacityError`. Running requests are never ended to
make room (the admission policy is `admission.AdmissionPolicy`, a base class of `Scheduler`). It does no chat
rendering policy and no SoT logic: it receives requests, streams tokens back to asyncio queues, and accounts
for what it did.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sot.backends.base import Chunk, FinishReason, GenerationRequest, Usage
from sot.backends.local.admission import AdmissionPolicy
from sot.backends.local.kv_cells import KvCells
from sot.backends.local.llama_runtime import BACKEND_NAME, ContextParams, LlamaRuntime
from sot.backends.local.requests import Counters, LocalRequest, Outbox, as_backend_error, prepare
from sot.backends.local.sampling import REPEAT_WINDOW
from sot.backends.local.threads import ThreadAdvisor, usable_cores
from sot.errors import BackendError, ConfigError, SoTError

log = logging.getLogger(__name__)

__all__ = ["BACKEND_NAME", "Scheduler", "SchedulerConfig"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How to build the llama.cpp context and admit work; fixed for the scheduler's lifetime."""

    n_ctx: int = 8192
    n_threads: int | None = None
    max_sequences: int = 16  # concurrently generating requests
    max_retained: int = 4  # finished sequences kept as prefix cache (LRU)
    n_batch: int = 512  # tokens per llama_decode call (prompt chunks + one per running sequence)
    # -1 auto, 0 off, 1 on. Auto picks flash attention on CPU in this llama.cpp; measured no worse.
    flash_attn: int = -1
    # Seconds a request may wait for room (KV cells or a free sequence) before it gets BackendCapacityError.
    admission_wait: float = 60.0


class _Entry(NamedTuple):
    """One token of a step's batch."""

    req: LocalRequest
    token: int
    pos: int
    wants_logits: bool


@dataclass(slots=True)
class _Call:
    fn: Callable[[], object]
    future: concurrent.futures.Future[object]


_STOP = object()


class Scheduler(AdmissionPolicy):
    """The worker thread and everything it owns. Public methods are thread-safe."""

    # worker-owned, set once the model is loaded
    _rt: LlamaRuntime
    _cells: KvCells

    def __init__(self, model_file: Callable[[], Path], config: SchedulerConfig) -> None:
        # `model_file` runs on the worker thread (it may re-encode weights), keeping the event loop free.
        self._model_file = model_file
        self.config = config
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._ids = itertools.count(1)
        self._stats = Counters()
        self._cells_used = 0
        self.model_path: Path | None = None
        # worker-owned
        self._waiting: collections.deque[LocalRequest] = collections.deque()
        self._active: list[LocalRequest] = []
        self._step_no = 0
        self._evictions_seen = 0
        self._out = Outbox(on_lost=self.cancel)
        self._max_active = 0
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

    def submit(self, request: GenerationRequest, *, ignore_eos: bool = False) -> LocalRequest:
        """Queue a request; its chunks (or one exception) arrive on `handle.sink` in the caller's loop."""
        self.start()
        handle = LocalRequest(
            id=next(self._ids),
            request=request,
            loop=asyncio.get_running_loop(),
            sink=asyncio.Queue(),
            ignore_eos=ignore_eos,
        )
        self._inbox.put(handle)
        return handle

    def cancel(self, handle: LocalRequest) -> None:
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
        return self._stats.snapshot()

    def kv_cells_used(self) -> int:
        return self._cells_used

    # ---------------------------------------------------------------- worker: lifecycle
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # loading failed: every request gets the reason
            err = (
                exc
                if isinstance(exc, SoTError)
                else BackendError(f"loading the local model failed: {exc}", backend=BACKEND_NAME)
            )
            self._load_error = err
            self._ready.set()
            self._serve_load_error(err)
            return
        self._stats.set("threads", self._threads)
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _serve_load_error(self, err: BaseException) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if isinstance(item, LocalRequest):
                self._out.deliver(item, as_backend_error(err))
                self._out.flush()
            elif isinstance(item, _Call):
                item.future.set_result(None)

    def _load(self) -> None:
        cfg = self.config
        path = self._model_file()
        self.model_path = path
        n_seq = min(cfg.max_sequences + cfg.max_retained, LlamaRuntime.max_sequences())
        if n_seq < 2:
            raise ConfigError("max_sequences must be at least 1")
        # An explicit thread count is obeyed; otherwise it follows the cores other processes leave free.
        self._advisor = None if cfg.n_threads else ThreadAdvisor(usable_cores())
        self._threads = cfg.n_threads or (self._advisor.measure_now() if self._advisor else 1)
        params = ContextParams(cfg.n_ctx, cfg.n_batch, n_seq, self._threads, cfg.flash_attn)
        self._rt = LlamaRuntime(path, params)
        self._max_active = min(cfg.max_sequences, n_seq - 1)
        rt = self._rt
        self._cells = KvCells(
            capacity=rt.n_ctx,
            n_slots=n_seq,
            max_retained=n_seq - self._max_active,
            seq_cp=rt.seq_cp,
            seq_rm=rt.seq_rm,
        )

    def _shutdown(self) -> None:
        closed = BackendError("the local backend was closed", backend=BACKEND_NAME)
        for req in [*self._active, *self._waiting]:
            self._out.deliver(req, closed)
        self._active.clear()
        self._waiting.clear()
        while True:  # answer anything still queued so no caller waits forever
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, LocalRequest):
                self._out.deliver(item, closed)
            elif isinstance(item, _Call):
                item.future.set_exception(closed)
        self._out.flush()
        self._rt.close()
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
            self._cells_used = self._cells.used
            if self._active or self._waiting:
                try:
                    self._step()
                except Exception as exc:
                    log.exception("local engine step failed")
                    self._fail_everything(exc)
            self._out.flush()

    def _handle(self, item: object) -> None:
        if isinstance(item, LocalRequest):
            try:
                prepare(item, self._rt, self._cells.capacity)
            except SoTError as exc:
                self._refuse(item, exc)
                return
            self._waiting.append(item)
        elif isinstance(item, tuple) and item[0] == "cancel" and isinstance(item[1], LocalRequest):
            req = item[1]
            if not req.closed:
                req.closed = True
                self._stats.bump("cancelled")
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
        self._expire_waiting()
        self._admit()
        if self._active:
            self._decode_once()
        evictions = self._cells.evictions
        self._stats.add(busy_seconds=time.perf_counter() - t0)
        if evictions != self._evictions_seen:
            self._stats.add(evictions=evictions - self._evictions_seen)
        self._evictions_seen = evictions
        self._cells_used = self._cells.used

    def _plan(self) -> list[_Entry]:
        """This step's batch: running sequences' next tokens first, then prompt chunks sized by free cells."""
        entries: list[_Entry] = []
        for req in self._active:
            if req.next_token is not None and req.slot is not None:
                entries.append(_Entry(req, req.next_token, len(req.slot.tokens), True))
        budget = min(self.config.n_batch, self._cells.capacity - self._cells.used) - len(entries)
        for req in self._active:
            if budget <= 0:
                break
            if req.next_token is None and req.prompt_done < len(req.prompt):
                start = req.prompt_done
                take = min(budget, len(req.prompt) - start)
                last = len(req.prompt) - 1
                entries.extend(_Entry(req, req.prompt[j], j, j == last) for j in range(start, start + take))
                budget -= take
        return entries

    def _decode_once(self) -> None:
        while True:
            entries = self._plan()
            if not entries:
                return
            rc = self._rt.decode(
                [e.token for e in entries],
                [e.pos for e in entries],
                [e.req.slot.seq if e.req.slot is not None else -1 for e in entries],
                [e.wants_logits for e in entries],
            )
            if rc == 0:
                break
            if rc != 1:
                raise BackendError(f"llama_decode failed (rc={rc})", backend=BACKEND_NAME)
            # No free cell although the book says there is room: free cache, else fail the newest request.
            self._stats.bump("decode_no_room")
            if not self._relieve_pressure():
                msg = "llama_decode found no free KV cell and nothing is left to free"
                raise BackendError(msg, backend=BACKEND_NAME)
        self._commit(entries)

    def _commit(self, entries: list[_Entry]) -> None:
        """Record a decoded batch, then sample every sequence that got logits."""
        self._stats.add(
            decode_steps=1,
            batch_tokens=len(entries),
            decoded_tokens=sum(1 for e in entries if e.req.next_token is not None),
        )
        self._stats.bump(f"batch_size.{len({e.req.id for e in entries})}")
        # Commit the decoded tokens to their sequences before sampling (the penalty window reads them).
        per_request: dict[LocalRequest, list[int]] = {}
        for e in entries:
            per_request.setdefault(e.req, []).append(e.token)
        for req, tokens in per_request.items():
            if req.slot is not None:
                self._cells.grow(req.slot, tokens)
            if req.next_token is None:
                req.prompt_done += len(tokens)
        for i, e in enumerate(entries):
            req = e.req
            if not e.wants_logits or req.closed:
                continue
            req.next_token = None
            try:
                self._after_logits(req, i)
            except Exception as exc:  # one request's failure must not take the batch down
                log.exception("local engine: request %d failed", req.id)
                self._out.deliver(req, as_backend_error(exc))
                self._release(req)

    def _adjust_threads(self) -> None:
        if self._advisor is None:
            return
        want = self._advisor.update()
        if want is not None and want != self._threads:
            log.debug("threads %d -> %d (others use %.2f cores)", self._threads, want, self._advisor.others)
            self._rt.set_threads(want)
            self._threads = want
            self._stats.set("threads", want)
            self._stats.bump("thread_changes")

    def _sample(self, req: LocalRequest, logits: np.ndarray) -> int:
        if req.sampler is None or req.slot is None:
            raise RuntimeError(f"request {req.id} is not running")
        return req.sampler.sample(logits, req.slot.tokens[-REPEAT_WINDOW:])

    def _after_logits(self, req: LocalRequest, batch_index: int) -> None:
        if req.text is None:
            raise RuntimeError(f"request {req.id} was not prepared")
        token = self._sample(req, self._rt.logits(batch_index))
        if not req.ignore_eos and self._rt.is_end_of_generation(token):
            self._finish(req, "stop")
            return
        req.completion_tokens += 1
        self._stats.bump("generated_tokens")
        text = req.text.push(self._rt.piece(token))
        self._out.emit(req, text)
        if req.text.stopped:
            self._finish(req, "stop")
        elif req.completion_tokens >= req.request.sampling.max_tokens:
            self._finish(req, "length")
        else:  # its reservation holds this token's cell: admission counted max_tokens - 1 decoded tokens
            req.next_token = token

    # ---------------------------------------------------------------- worker: finishing and freeing
    def _finish(self, req: LocalRequest, reason: FinishReason) -> None:
        tail = req.text.flush() if req.text is not None else ""
        usage = Usage(
            prompt_tokens=len(req.prompt),
            completion_tokens=req.completion_tokens,
            computed_prompt_tokens=len(req.prompt) - req.reused,
        )
        # Release first: by the time the consumer sees the final chunk, the engine no longer holds it.
        self._release(req)
        self._out.deliver(req, Chunk(text=tail, finish_reason=reason, usage=usage))

    def _release(self, req: LocalRequest, *, retain: bool = True) -> None:
        """Take `req` out of the batch; its sequence becomes prefix cache (bounded, LRU) or is freed."""
        if req in self._active:
            self._active.remove(req)
        slot, req.slot = req.slot, None
        req.next_token = None
        if slot is not None:
            self._cells.finish(slot, retain=retain)

    def clear_prefix_cache(self) -> None:
        """(worker) Free every retained sequence."""
        self._cells.clear_retained()
        self._cells_used = self._cells.used

    def seq_lengths(self) -> dict[int, int]:
        """(worker) Sequence id -> positions llama.cpp holds for it, straight from the KV cache."""
        out = {}
        for s in self._cells.slots:
            _lo, hi = self._rt.seq_pos_range(s.seq)
            if hi >= 0:
                out[s.seq] = hi + 1
        return out

    def _fail_everything(self, exc: BaseException) -> None:
        """After a failed step the cache may be inconsistent: fail live requests and start clean."""
        err = as_backend_error(exc)
        for req in [*self._active, *self._waiting]:
            self._out.deliver(req, err)
            req.slot = None
        self._active.clear()
        self._waiting.clear()
        self._rt.clear_memory()
        self._cells.reset()
        self._cells_used = 0
        self._stats.bump("errors")
