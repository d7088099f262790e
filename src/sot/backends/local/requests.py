"""One request inside the local engine: its preparation, its state, the hand-over of its chunks, the counters."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sot.backends.base import Chunk, GenerationRequest
from sot.backends.local.kv_cells import Slot
from sot.backends.local.llama_runtime import BACKEND_NAME, LlamaRuntime
from sot.backends.local.sampling import Sampler
from sot.backends.local.text_stream import TextStream
from sot.errors import BackendCapacityError, BackendError, BadRequestError, ConfigError, SoTError


@dataclass(eq=False, slots=True)
class LocalRequest:
    """One stream's state; the fields below `arrived` belong to the scheduler's worker thread."""

    id: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[Chunk | BaseException]
    ignore_eos: bool = False
    arrived: float = field(default_factory=time.monotonic)
    # worker-side state
    prompt: list[int] = field(default_factory=list)
    reserve: int = 0  # KV cells its sequence may grow to: the prompt and every token it may still decode
    prompt_done: int = 0  # prompt tokens whose KV is in this request's sequence
    reused: int = 0  # of which copied from the prefix cache
    slot: Slot | None = None
    sampler: Sampler | None = None
    text: TextStream | None = None
    next_token: int | None = None  # sampled, not yet decoded
    completion_tokens: int = 0
    admitted_step: int = 0
    waited: bool = False  # was held back at least once for want of KV cells
    closed: bool = False  # the final chunk or an error was delivered, or the consumer went away


class Outbox:
    """Chunks produced during one step, handed to their event loops together: one `call_soon_threadsafe`
    per loop and step, not per chunk (each call writes to the loop's self-pipe and wakes it)."""

    def __init__(self, on_lost: Callable[[LocalRequest], None]) -> None:
        # Called (on the worker) for each request whose event loop is closed: nobody will read it.
        self._on_lost = on_lost
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[LocalRequest, Chunk | BaseException]]] = {}

    def emit(self, req: LocalRequest, text: str) -> None:
        """Queue new text of a running request (nothing when empty)."""
        if text:
            self.deliver(req, Chunk(text=text), final=False)

    def deliver(self, req: LocalRequest, item: Chunk | BaseException, *, final: bool = True) -> None:
        """Queue `item` for the request's consumer; a final item (last chunk or error) closes the request."""
        if req.closed:
            return
        if final:
            req.closed = True
        self._items.setdefault(req.loop, []).append((req, item))

    def flush(self) -> None:
        """Hand everything queued since the last flush to its event loop."""
        if not self._items:
            return
        items, self._items = self._items, {}
        for loop, batch in items.items():
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # the consumer's event loop is closed
                for req, _item in batch:
                    req.closed = True
                    self._on_lost(req)


def _dispatch(items: list[tuple[LocalRequest, Chunk | BaseException]]) -> None:
    """(event loop) Put each item on its request's queue."""
    for req, item in items:
        req.sink.put_nowait(item)


def as_backend_error(exc: BaseException) -> BackendError:
    """What a stream raises: BackendErrors as they are, anything else wrapped (the original as cause)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, SoTError):  # e.g. a ConfigError from loading: keep its words
        err = BackendError(str(exc), backend=BACKEND_NAME)
    else:
        err = BackendError(f"local engine error: {type(exc).__name__}: {exc}", backend=BACKEND_NAME)
    err.__cause__ = exc
    return err


def prepare(req: LocalRequest, rt: LlamaRuntime, capacity: int) -> None:
    """Render and tokenize the request's prompt and set its KV reservation.

    Refuses what can never run: BadRequestError for a malformed request or a prompt longer than the
    context, BackendCapacityError when the prompt plus room for `max_tokens` exceeds the whole KV cache.
    """
    r = req.request
    max_tokens = r.sampling.max_tokens
    if max_tokens < 1:
        raise BadRequestError("max_tokens must be at least 1", status_code=400, backend=BACKEND_NAME)
    try:
        text = rt.template.render(r.messages, r.prefill)
    except ConfigError as exc:
        raise BadRequestError(str(exc), status_code=400, backend=BACKEND_NAME) from exc
    prompt = rt.tokenize(text)
    if rt.bos is not None and (not prompt or prompt[0] != rt.bos):
        prompt.insert(0, rt.bos)
    if not prompt:
        raise BadRequestError("the rendered prompt is empty", status_code=400, backend=BACKEND_NAME)
    if len(prompt) >= rt.n_ctx:
        raise BadRequestError(
            f"the prompt has {len(prompt)} tokens; the local context holds {rt.n_ctx}",
            status_code=400,
            backend=BACKEND_NAME,
        )
    # The last generated token is never decoded, so the sequence grows to prompt + max_tokens - 1 cells.
    reserve = len(prompt) + max_tokens - 1
    if reserve > capacity:
        raise BackendCapacityError(
            f"the request needs {reserve} KV cells ({len(prompt)} prompt tokens and room to generate "
            f"max_tokens={max_tokens}) but the KV cache holds only {capacity}; lower max_tokens or shorten "
            "the prompt",
            backend=BACKEND_NAME,
        )
    req.prompt = prompt
    req.reserve = reserve
    req.sampler = Sampler(r.sampling)
    req.text = TextStream(r.stop)


class Counters:
    """Cumulative engine counters: written by the worker thread, read from any thread."""

    # Read as 0 before anything happened; the others appear when they first count something.
    ALWAYS = (
        "requests",
        "prompt_tokens",
        "prompt_tokens_computed",
        "prompt_tokens_reused",
        "decode_steps",
        "decoded_tokens",
        "batch_tokens",
        "generated_tokens",
        "busy_seconds",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: collections.defaultdict[str, float] = collections.defaultdict(float)

    def bump(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._values[key] += n

    def add(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self._values[k] += v

    def set(self, key: str, value: float) -> None:
        with self._lock:
            self._values[key] = value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self._values.items()}
        for key in self.ALWAYS:
            out.setdefault(key, 0.0)
        return out
