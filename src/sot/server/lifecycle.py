"""Graceful restarts: on SIGTERM (or Ctrl-C) a worker stops admitting, lets the answers in flight finish for up
to `drain_seconds`, cancels the rest, then shuts down (closing the upstream connections) and exits 0.

While it drains, the worker still accepts connections: /ready answers 503 and new questions get a 503 with
`Retry-After` (and `Connection: close`), so a load balancer or client moves on rather than seeing refused
connections. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn

from sot.server.admission import shutdown_error
from sot.server.state import AppState

log = logging.getLogger("sot.server")
AFTER_CANCEL = 2.0  # seconds for cancelled answers to end their streams


async def drain(state: AppState) -> None:
    """Stop admitting, wait for the questions in flight (up to `drain_seconds`), then cancel what is left."""
    state.draining = True
    if await state.gate.wait_idle(state.settings.drain_seconds) or not state.pumps:
        return
    log.warning("drain time over: cancelling %d answer(s) in flight", len(state.pumps))
    for pump in list(state.pumps):
        pump.abort(shutdown_error())
    await state.gate.wait_idle(AFTER_CANCEL)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains (see the module) instead of closing the
    listening socket at once; it exits 0 rather than re-raising the signal. With `parent_pid` (a worker), it
    also drains when its supervisor has gone away."""

    def __init__(self, config: uvicorn.Config, state: AppState, parent_pid: int | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.parent_pid = parent_pid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:  # before startup: nothing to drain
            self.should_exit = True
            return
        if self.state.draining:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state)
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        orphaned = self.parent_pid is not None and counter % 10 == 0 and os.getppid() != self.parent_pid
        if orphaned and not self.state.draining:
            self.handle_exit(signal.SIGTERM, None)
        return await super().on_tick(counter)
