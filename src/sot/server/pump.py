"""The stream pump: runs one engine stream in a task of its own, primes it before any byte is sent, hands its
events over in batches, and cancels it when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from sot.backends.base import Message
from sot.engine import Engine
from sot.events import Accepted, Done, Event, Mode, Result
from sot.server.admission import Lease
from sot.server.errors import map_error
from sot.server.observe import current_record

_END = object()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Observer(Protocol):
    """What sees every event of a run as it happens (the request's record)."""

    def see(self, event: Event) -> None: ...


class EventPump:
    """Runs one engine stream in a task of its own and hands its events over through a queue.

    The stream is iterated by one task from start to end, whichever request task reads the events (the
    handler while it waits for the first event, then the SSE response's task): the engine's deadlines are
    task-bound. Closing the pump cancels that task, which closes the engine stream, which cancels every
    request of the question. The lease is released when the engine's work ends, however it ends.
    """

    def __init__(
        self,
        engine: Engine,
        messages: list[Message],
        mode: Mode,
        lease: Lease,
        *,
        session: str | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = False
        self._error: BaseException | None = None
        self._observer = observer
        self._task = asyncio.create_task(self._run(engine, messages, mode, session))
        self._task.add_done_callback(lambda _: lease.release())

    async def _run(self, engine: Engine, messages: list[Message], mode: Mode, session: str | None) -> None:
        try:
            async with contextlib.aclosing(engine.stream(messages, mode, session=session)) as events:
                async for event in events:
                    if self._observer is not None:
                        self._observer.see(event)
                    self._queue.put_nowait(event)
        except Exception as exc:  # handed to the reader, who decides the status
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(_END)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the engine's work has ended, however it ended."""
        self._task.add_done_callback(lambda _: callback())

    def abort(self, error: BaseException) -> None:
        """Cancel the engine's work now; the reader gets `error` after the events already handed over."""
        if not self._task.done():
            self._task.cancel()
            self._queue.put_nowait(error)

    async def next_batch(self) -> list[Event]:
        """Every event available now (waiting for at least one); [] after the last; raises what the engine
        raised once the events before it have been handed over.

        Taking all queued events at once lets a busy server write them in one go: under load the backlog
        is sent in fewer, larger writes instead of falling further behind; when idle, a batch is one event.
        """
        if self._error is not None:
            error, self._error, self._finished = self._error, None, True
            raise error
        if self._finished:
            return []
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        events: list[Event] = []
        for item in items:
            if item is _END:
                self._finished = True
                break
            if isinstance(item, BaseException):
                self._error = item
                break
            events.append(item)
        if not events and self._error is not None:
            return await self.next_batch()
        return events

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next message is the disconnect (the server also sends it when the
    # response is complete, but by then this watcher has been cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, but cancel it and raise `ClientGone` if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def start_stream(request: Request, pump: EventPump, retry_after: int) -> list[Event] | Response:
    """Prime `pump` before any byte is sent: the primed events, or a 499 if the client left meanwhile.

    A failure to start is raised as the `ApiError` the client should get; on failure or 499 the pump is
    closed, on success the caller streams from it.
    """
    try:
        primed: list[Event] = await unless_disconnected(request, prime(pump))
        return primed
    except ClientGone:
        await pump.aclose()
        return Response(status_code=499)
    except Exception as exc:
        await pump.aclose()
        error = map_error(exc, retry_after)
        current_record().failed(error.code)
        raise error from exc


async def prime(pump: EventPump) -> list[Event]:
    """Events up to the backend's acceptance of the run's first request, as hosted APIs decide a stream's
    status: a refusal before it (a rate limit with its Retry-After, bad credentials, an unreachable or
    failing upstream, after the engine's retries) becomes the same HTTP status a non-streamed request gets;
    after it, headers go out at once and keep-alive comments hold the connection until content flows."""
    primed: list[Event] = []
    while batch := await pump.next_batch():
        primed.extend(batch)
        if any(isinstance(event, Accepted | Done) for event in batch):
            return primed
    return primed


async def batches(primed: list[Event], pump: EventPump) -> AsyncIterator[list[Event]]:
    """The primed events, then the pump's batches until the end."""
    if primed:
        yield primed
    while batch := await pump.next_batch():
        yield batch


async def final_result(pump: EventPump) -> Result:
    """The result of a pump's run, read to its end (the engine's error, if it failed)."""
    result: Result | None = None
    while batch := await pump.next_batch():
        for event in batch:
            if isinstance(event, Done):
                result = event.result
    if result is None:  # the engine contract: a stream that does not raise ends with Done
        raise RuntimeError("the engine ended without a result")
    return result
