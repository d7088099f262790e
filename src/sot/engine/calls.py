"""One backend request, consumed under a deadline and checked against the `Backend` contract.

This is the engine's only door to a backend. Whatever a backend does, a call ends in a `CallOutcome` or a
`sot.errors.BackendError` within its deadline: a stall (no chunk for `stall_timeout` seconds) or a
deadline becomes `BackendTimeoutError` naming the stage and the limit hit; an empty stream, a stream
without a finish reason or a foreign exception becomes a `ContractError` naming the backend; a
`CancelledError` that nobody asked for is not passed off as the caller's cancellation. The stream is
closed on every way out, so no request outlives its call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sot.backends.base import Backend, Chunk, GenerationRequest, Usage
from sot.engine.retry import ContractError
from sot.errors import BackendError, BackendTimeoutError


@dataclass(frozen=True, slots=True)
class Deadline:
    """A named point in time (event-loop clock) by which a stage must be over."""

    name: str  # the setting that set it, e.g. "point_deadline"
    seconds: float
    at: float

    @classmethod
    def after(cls, name: str, seconds: float) -> Deadline:
        return cls(name, seconds, asyncio.get_running_loop().time() + seconds)

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()


def cancel_requested() -> bool:
    """Whether the current task was asked to stop (by us or our caller), as opposed to a `CancelledError`
    that some code raised on its own: only the first may pass as a cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def earliest(*deadlines: Deadline) -> Deadline:
    """The deadline that comes first."""
    return min(deadlines, key=lambda d: d.at)


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How one request ended: `finish` is "stop" or "length", or "early" when the caller stopped reading."""

    chunks: int  # chunks that carried text
    finish: str
    usage: Usage | None


# Return True from `on_text` to stop reading (the caller has all it wants); the stream is then closed.
TextSink = Callable[[str], bool]


async def call_backend(
    backend: Backend,
    request: GenerationRequest,
    *,
    stage: str,
    deadline: Deadline,
    stall_timeout: float,
    on_text: TextSink,
    on_accepted: Callable[[], None] = lambda: None,
) -> CallOutcome:
    """Send `request` and feed its text to `on_text` until it finishes, the caller stops, or a limit is hit."""
    loop = asyncio.get_running_loop()
    chunks = 0
    last: Chunk | None = None
    with _mapped(backend, stage, deadline, stall_timeout) as limits:
        async with asyncio.timeout_at(min(deadline.at, loop.time() + stall_timeout)) as timer:
            limits.timer = timer
            async with _closing(backend.stream(request)) as stream:
                slack = stall_timeout / 4  # re-arming a timer per token costs more than the stall check needs
                async for chunk in stream:
                    wanted = min(deadline.at, loop.time() + stall_timeout)
                    if wanted - (timer.when() or 0.0) > slack:
                        timer.reschedule(wanted)
                    _check_chunk(backend, chunk, last)
                    on_accepted()
                    last = chunk
                    if chunk.text:
                        chunks += 1
                        if on_text(chunk.text):
                            return CallOutcome(chunks, "early", None)
    if last is None:
        raise ContractError(
            f"the {backend.name} backend's stream for the {stage} ended without any chunk", backend=backend.name
        )
    if last.finish_reason is None:
        raise ContractError(
            f"the {backend.name} backend's stream for the {stage} ended without a finish reason", backend=backend.name
        )
    return CallOutcome(chunks, last.finish_reason, last.usage)


def _check_chunk(backend: Backend, chunk: object, previous: Chunk | None) -> None:
    if not isinstance(chunk, Chunk):
        raise ContractError(
            f"the {backend.name} backend yielded {type(chunk).__name__}, not a Chunk", backend=backend.name
        )
    if previous is not None and previous.finish_reason is not None:
        raise ContractError(f"the {backend.name} backend sent a chunk after its finish reason", backend=backend.name)


class _Limits:
    """What `_mapped` needs to tell our own deadline from a backend's `TimeoutError`."""

    timer: asyncio.Timeout | None = None


@contextlib.contextmanager
def _mapped(backend: Backend, stage: str, deadline: Deadline, stall_timeout: float) -> Iterator[_Limits]:
    """Map everything a call can raise to `sot.errors`, at one boundary (httpx's habit)."""
    limits = _Limits()
    try:
        yield limits
    except BackendError:
        raise
    except TimeoutError as exc:
        if limits.timer is not None and limits.timer.expired():
            if deadline.left() <= 0:
                message = f"the {stage} hit its {deadline.seconds:g} s deadline ({deadline.name})"
            else:
                message = f"the {stage} got no token for {stall_timeout:g} s (stall_timeout)"
            raise BackendTimeoutError(message, backend=backend.name) from None
        raise BackendTimeoutError(
            f"the {backend.name} backend timed out during the {stage}: {exc or 'TimeoutError'}", backend=backend.name
        ) from exc
    except asyncio.CancelledError as exc:
        if cancel_requested():
            raise
        raise ContractError(
            f"the {backend.name} backend raised CancelledError during the {stage} without being cancelled",
            backend=backend.name,
        ) from exc
    except Exception as exc:
        raise ContractError(
            f"the {backend.name} backend failed during the {stage}: {type(exc).__name__}: {exc}", backend=backend.name
        ) from exc


@contextlib.asynccontextmanager
async def _closing(stream: Any) -> AsyncIterator[AsyncIterator[Chunk]]:
    """Close the backend's stream on every way out (an async iterator without `aclose` is left as is)."""
    try:
        yield stream
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
