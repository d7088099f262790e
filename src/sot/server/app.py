"""The `sot serve` web app: an OpenAI-compatible chat-completions API over the engine, its event stream, and the page.

Endpoints: `POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/sot/stream` (the engine's own events as SSE, which the page uses), `GET /health` (liveness),
`GET /ready` (readiness), `GET /metrics` (`--metrics`) and the page at `/`. The app translates between the
wire format and the engine and enforces the server's limits; it does no orchestration of its own (that is
`sot.engine`). `sot.server.workers` runs it in several processes, `sot.server.lifecycle` drains it on SIGTERM.

The modules of `sot.server`, by concern: `parsing` (settings, what a request asks for), `errors` (OpenAI
error objects), `admission` (the concurrency gate), `pump` (the engine run behind a request), `answer` (the
answer text a client reads), `chunks` (SSE bytes), `relay` (events to responses), `sse` (the streamed
response), `middleware` (body limit, auth), `routes` (the endpoints), `openapi` (the schema), `state` (what
requests share); for deployment
`observe` (each request's record and id), `routing` (the sticky upstream key), `metrics` (Prometheus),
`access_log` (JSON lines), `lifecycle` (draining) and `workers` (the multi-process supervisor).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from sot.engine import Engine
from sot.server.access_log import AccessLog
from sot.server.admission import Gate, Lease
from sot.server.answer import AnswerText, StopFilter, sot_info, usage
from sot.server.errors import ApiError, install_error_handlers, map_error
from sot.server.metrics import Metrics
from sot.server.middleware import BodyLimitMiddleware, require_key
from sot.server.observe import ObserveMiddleware
from sot.server.openapi import install_openapi
from sot.server.parsing import MODES, ServerSettings, check_supported, conversation, requested_max_tokens, resolve_mode
from sot.server.pump import ClientGone, EventPump, batches, prime, start_stream
from sot.server.routes import STATIC_DIR, api, metrics_router, router
from sot.server.state import AppState, EngineSource

__all__ = [
    "MODES",
    "AnswerText",
    "ApiError",
    "AppState",
    "BodyLimitMiddleware",
    "ClientGone",
    "EngineSource",
    "EventPump",
    "Gate",
    "Lease",
    "ServerSettings",
    "StopFilter",
    "batches",
    "check_supported",
    "conversation",
    "create_app",
    "map_error",
    "prime",
    "requested_max_tokens",
    "require_key",
    "resolve_mode",
    "sot_info",
    "start_stream",
    "usage",
]


def create_app(source: EngineSource, settings: ServerSettings | None = None) -> FastAPI:
    """The server app over an engine, a backend, or a zero-argument factory of an engine.

    A backend, or the backend of an engine built by a factory, is the app's: it is closed at shutdown.
    An `Engine` passed in as such stays its owner's.
    """
    settings = settings or ServerSettings()
    metrics = Metrics() if settings.metrics else None
    gate = Gate(
        settings.max_concurrency,
        settings.retry_after,
        on_enter=metrics.question_started if metrics else None,
        on_leave=metrics.question_ended if metrics else None,
    )
    access_log = AccessLog(settings.access_log_json) if settings.access_log_json else None
    state = AppState(settings=settings, source=source, gate=gate, metrics=metrics, access_log=access_log)
    owns_backend = not isinstance(source, Engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.get_engine()
        try:
            yield
        finally:
            if owns_backend and state.engine is not None:
                await state.engine.backend.aclose()
            if state.access_log is not None:
                state.access_log.close()

    app = FastAPI(
        title="sot serve",
        summary="An OpenAI-compatible Skeleton-of-Thought server.",
        version="1",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.sot = state
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    # Added last, so it runs first: every request, the 413s of the body limit included, gets an id and a record.
    app.add_middleware(ObserveMiddleware, finish=state.finish)
    install_openapi(app, auth=settings.api_key is not None)
    install_error_handlers(app, settings.retry_after)
    app.include_router(router)
    if settings.metrics:
        app.include_router(metrics_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api)
    return app
