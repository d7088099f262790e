"""Admission: how many questions the server (each worker) answers at once, the 429 for one more, and the 503
while it drains before a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sot.server.errors import ApiError

Hook = Callable[[], None]


class Gate:
    """Counts questions in flight; a question beyond the limit is refused at once, never queued.

    `on_enter` and `on_leave` run as a question takes and gives back its slot (the in-flight gauge).
    """

    def __init__(
        self, limit: int, retry_after: int = 1, *, on_enter: Hook | None = None, on_leave: Hook | None = None
    ) -> None:
        self.limit = limit
        self.retry_after = retry_after  # seconds, sent with the 429
        self.active = 0
        self.on_enter = on_enter
        self.on_leave = on_leave
        self._idle: asyncio.Event | None = None

    def enter(self) -> Lease:
        """A slot for one question, or a 429 with `Retry-After` when every slot is taken."""
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"The server is answering {self.active} questions, its limit; retry in {self.retry_after} s.",
                type="rate_limit_error",
                code="server_overloaded",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1
        if self.on_enter is not None:
            self.on_enter()
        return Lease(self)

    def leave(self) -> None:
        self.active -= 1
        if self.on_leave is not None:
            self.on_leave()
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until no question is in flight, at most `seconds`; whether it is so."""
        if self.active == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._idle.wait()
        except TimeoutError:
            return self.active == 0
        return True


class Lease:
    """One question's slot in the `Gate`; releasing twice is harmless (several cleanup paths may run)."""

    def __init__(self, gate: Gate) -> None:
        self._gate: Gate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.leave()
            self._gate = None


def draining_error(retry_after: int) -> ApiError:
    """The 503 for a question that arrives while the server drains (it closes the connection, so the client's
    retry reaches a server that is not going away)."""
    return ApiError(
        503,
        f"The server is shutting down and takes no new questions; retry in {retry_after} s.",
        type="server_error",
        code="server_draining",
        headers={"Retry-After": str(retry_after), "Connection": "close"},
    )


def shutdown_error() -> ApiError:
    """What a question still running when the drain time is over ends with."""
    return ApiError(
        503,
        "The server shut down before this answer was finished.",
        type="server_error",
        code="server_shutting_down",
    )
