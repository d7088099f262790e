"""`RunHandle`: a started run, whose work goes on in one task while its events are read in batches.

`Engine.stream` reads one; so does the server, straight from the run's queue with no task of its own in
between (a relay of thousands of events a second pays for every hop between tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sot.engine.calls import cancel_requested
from sot.errors import SoTError
from sot.events import Done, ErrorEvent, Event


@dataclass(frozen=True)
class Failed:
    """The run ended in an error (put in the queue by the run's task)."""

    error: SoTError


Emit = Callable[[Event | Failed], None]


class RunHandle:
    """The task of one run and the queue its events arrive in.

    `next_batch` hands over every event that has arrived (waiting for at least one): a `Done`, or an
    `ErrorEvent` whose error is raised by the following call. `abort(error)` cancels the work now and makes the
    reader get `error` after the events already handed over; `aclose()` cancels it and waits until it ended.
    """

    def __init__(
        self, work: Callable[[Emit], Coroutine[Any, Any, None]], observe: Callable[[Event], None] | None
    ) -> None:
        self._queue: asyncio.Queue[Event | Failed | BaseException] = asyncio.Queue()
        self._observe = observe
        self._pending: BaseException | None = None  # to raise once the events before it were handed over
        self._finished = False
        self.task = asyncio.create_task(work(self._emit))

    def _emit(self, item: Event | Failed) -> None:
        if self._observe is not None and not isinstance(item, Failed):
            self._observe(item)
        self._queue.put_nowait(item)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the run's task has ended, however it ended."""
        self.task.add_done_callback(lambda _: callback())

    def abort(self, error: BaseException) -> None:
        """Cancel the run's work now; the reader gets `error` after the events already in the queue."""
        if not self.task.done():
            self.task.cancel()
        if not self._finished:
            self._queue.put_nowait(error)

    async def next_batch(self, wait: float | None = None) -> list[Event] | None:
        """Every event available now, waiting up to `wait` seconds for one (None when none came in time);
        [] after the last event; the run's error once the events before it have been handed over."""
        if self._pending is not None:
            error, self._pending, self._finished = self._pending, None, True
            raise error
        if self._finished:
            return []
        if not self._queue.empty():
            items = [self._queue.get_nowait()]
        elif wait is None:
            items = [await self._queue.get()]
        else:
            try:
                async with asyncio.timeout(wait):
                    items = [await self._queue.get()]
            except TimeoutError:
                return None
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        events: list[Event] = []
        for item in items:
            if isinstance(item, Failed):
                events.append(ErrorEvent(error=str(item.error), kind=type(item.error).__name__))
                self._pending = item.error
                break
            if isinstance(item, BaseException):
                self._pending = item
                break
            events.append(item)
            if isinstance(item, Done):
                self._finished = True
                break
        if not events and self._pending is not None:
            return await self.next_batch()
        return events

    async def aclose(self) -> None:
        """Cancel the run's task if it still runs and wait until it has ended; our own cancellation goes on."""
        self._finished = True
        if self.task.done():
            return
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            if cancel_requested():
                raise
