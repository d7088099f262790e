"""The state one app shares between its requests: settings, the admission gate, the engine, the questions in
flight (to cancel when a drain runs out of time), and where finished requests are reported."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from sot.backends.base import Backend
from sot.engine import Engine
from sot.server.access_log import AccessLog
from sot.server.admission import Gate
from sot.server.metrics import Metrics
from sot.server.observe import RequestRecord
from sot.server.parsing import ServerSettings
from sot.server.pump import EventPump
from sot.server.routing import forward_request_ids

EngineSource = Engine | Backend | Callable[[], Engine]


@dataclass
class AppState:
    """Settings, the gate, and the engine (built from its source on first use)."""

    settings: ServerSettings
    source: EngineSource
    gate: Gate
    started: int = field(default_factory=lambda: int(time.time()))
    engine: Engine | None = None
    draining: bool = False  # after SIGTERM: not ready, no new questions
    pumps: set[EventPump] = field(default_factory=set)
    metrics: Metrics | None = None
    access_log: AccessLog | None = None

    def get_engine(self) -> Engine:
        # Built on first use rather than only in the lifespan: ASGI test transports may skip the lifespan.
        if self.engine is None:
            source = self.source
            if isinstance(source, Engine):
                self.engine = source
            elif isinstance(source, Backend):
                self.engine = Engine(source)
            else:
                self.engine = source()
            forward_request_ids(self.engine.backend)
        return self.engine

    def track(self, pump: EventPump) -> None:
        """Keep `pump` among the questions in flight until its engine work ends."""
        self.pumps.add(pump)
        pump.add_done_callback(lambda: self.pumps.discard(pump))

    def finish(self, record: RequestRecord) -> None:
        """A request is over: count it and log it."""
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.access_log is not None:
            self.access_log.write(record)


async def app_state(request: Request) -> AppState:
    """The state of the app serving `request` (async: FastAPI runs a plain function dependency in a worker
    thread, a thread hop per request for a dictionary lookup)."""
    state: AppState = request.app.state.sot
    return state
