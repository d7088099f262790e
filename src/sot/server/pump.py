"""The stream pump: starts one engine run, primes it before any byte is sent, hands its events over in batches,
and cancels it when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response

from sot.backends.base import Message
from sot.engine import Engine
from sot.engine.handle import RunHandle
from sot.events import Accepted, Done, Event, Mode, Result
from sot.server.admission import Lease
from sot.server.errors import map_error
from sot.server.observe import current_record


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Observer(Protocol):
    """What sees every event of a run as it happens (the request's record)."""

    def see(self, event: Event) -> None: ...


class EventPump:
    """One engine run for one request: the run's handle, the request's slot and a watch on its connection.

    The run works in a task of its own (`Engine.start`); the request's task reads its events in batches
    straight from the run's queue, first while the handler primes it, then in the streamed response. One
    watcher task waits for the client to disconnect and aborts the run with `ClientGone`. Closing the pump
    cancels the run, which cancels every request of the question; the slot is released when the run's
    work ends, however it ends.
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
        self._watcher: asyncio.Task[None] | None = None
        self._refused: BaseException | None = None  # the engine refused to start (bad input)
        self._handle: RunHandle | None = None
        try:
            self._handle = engine.start(
                messages, mode, session=session, observe=observer.see if observer is not None else None
            )
        except Exception as exc:  # handed to the reader, who decides the status
            self._refused = exc
            lease.release()
            return
        self._handle.add_done_callback(lease.release)

    def watch(self, request: Request) -> None:
        """Abort the run with `ClientGone` as soon as the client of `request` disconnects."""
        if self._handle is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        # The body has been read, so the next message is the disconnect (the server also sends one once the
        # response is complete, by which time the pump is closed and this task cancelled).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.abort(ClientGone())

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the engine's work has ended, however it ended."""
        if self._handle is None:
            callback()
        else:
            self._handle.add_done_callback(callback)

    def abort(self, error: BaseException) -> None:
        """Cancel the engine's work now; the reader gets `error` after the events already handed over."""
        if self._handle is not None:
            self._handle.abort(error)

    async def next_batch(self, wait: float | None = None) -> list[Event] | None:
        """Every event available now (waiting for at least one, or up to `wait` seconds: None if none came);
        [] after the last; raises what the engine raised once the events before it have been handed over.

        Taking all queued events at once lets a busy server write them in one go: under load the backlog
        is sent in fewer writes instead of falling further behind; when idle, a batch is one event.
        """
        if self._refused is not None:
            error, self._refused = self._refused, None
            raise error
        if self._handle is None:
            return []
        return await self._handle.next_batch(wait)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._handle is not None:
            await self._handle.aclose()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)


async def start_stream(pump: EventPump, retry_after: int) -> list[Event] | Response:
    """Prime `pump` before any byte is sent: the primed events, or a 499 if the client left meanwhile.

    A failure to start is raised as the `ApiError` the client should get; on failure or 499 the pump is
    closed, on success the caller streams from it.
    """
    try:
        return await prime(pump)
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


async def batches(primed: list[Event], pump: EventPump, ping: float | None = None) -> AsyncIterator[list[Event]]:
    """The primed events, then the pump's batches until the end; an empty batch after each `ping` seconds
    without an event (the caller sends a keep-alive comment)."""
    if primed:
        yield primed
    wait = ping if ping is not None and ping > 0 else None  # no keep-alives rather than a busy loop of them
    while (batch := await pump.next_batch(wait)) != []:
        yield batch or []


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
