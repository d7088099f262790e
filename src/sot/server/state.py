"""The state one app shares between its requests: settings, the admission gate, and the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from sot.backends.base import Backend
from sot.engine import Engine
from sot.server.admission import Gate
from sot.server.parsing import ServerSettings

EngineSource = Engine | Backend | Callable[[], Engine]


@dataclass
class AppState:
    """Settings, the gate, and the engine (built from its source on first use)."""

    settings: ServerSettings
    source: EngineSource
    gate: Gate
    started: int = field(default_factory=lambda: int(time.time()))
    engine: Engine | None = None

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
        return self.engine


def app_state(request: Request) -> AppState:
    """The state of the app serving `request`."""
    state: AppState = request.app.state.sot
    return state
