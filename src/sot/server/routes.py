"""The endpoints: the page, /health (liveness), /ready (readiness), /metrics, the OpenAI API (/v1/models,
/v1/chat/completions) and /v1/sot/stream.

Handlers only connect the pieces: parse the request (`parsing`), take a slot (`admission`), start the engine
(`pump`) and relay its events (`relay`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import FileResponse, Response

from sot.server.admission import draining_error
from sot.server.chunks import dumps
from sot.server.errors import ApiError
from sot.server.middleware import require_key
from sot.server.observe import current_record
from sot.server.openai_schema import (
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SoTStreamRequest,
)
from sot.server.openapi import CHAT_RESPONSES, ERROR_RESPONSES, EVENT_STREAM_RESPONSES
from sot.server.parsing import MODES, RunPlan, chat_plan, events_plan
from sot.server.pump import EventPump, start_stream
from sot.server.relay import chat_chunks, complete, engine_events, sse_response
from sot.server.routing import routing_key
from sot.server.state import AppState, app_state

STATIC_DIR = Path(__file__).parent / "static"

State = Annotated[AppState, Depends(app_state)]
ModeHeader = Annotated[str | None, Header(description="sot, normal or auto")]

router = APIRouter()
metrics_router = APIRouter(dependencies=[Depends(require_key)])
api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/health", response_model=Health, tags=["server"])
async def health(state: State) -> Health:
    """Liveness: the process answers (also while it drains; readiness is /ready)."""
    engine = state.get_engine()
    settings = state.settings
    return Health(
        backend=engine.backend.name,
        model=engine.backend.model,
        default_mode=settings.default_mode,
        auth=settings.api_key is not None,
        in_flight=state.gate.active,
        max_concurrency=settings.max_concurrency,
        ready=not state.draining,
    )


@router.get("/ready", include_in_schema=False)
async def ready(state: State) -> Response:
    """Readiness: 200 while the server takes questions, 503 once it drains before a restart."""
    if state.draining:
        headers = {"Retry-After": str(state.settings.retry_after)}
        return Response(dumps({"status": "draining"}), 503, headers, media_type="application/json")
    return Response(dumps({"status": "ready"}), media_type="application/json")


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus metrics (`--metrics`), in the text format."""
    if state.metrics is None:
        raise ApiError(404, "Metrics are off: start the server with --metrics.", code="not_found")
    body, content_type = state.metrics.exposition()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


def model_cards(state: AppState) -> list[ModelCard]:
    model = state.get_engine().backend.model
    ids = [model, *(f"{mode}:{model}" for mode in MODES)]
    return [ModelCard(id=i, created=state.started, owned_by="sot") for i in ids]


@api.get("/models", response_model=ModelList, tags=["openai"])
async def list_models(state: State) -> ModelList:
    return ModelList(data=model_cards(state))


@api.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse, "description": "No such model"}},
    tags=["openai"],
)
async def get_model(model_id: str, state: State) -> ModelCard:
    for card in model_cards(state):
        if card.id == model_id:
            return card
    raise ApiError(404, f"The model {model_id!r} does not exist on this server.", param="model", code="model_not_found")


def start(state: AppState, plan: RunPlan, request: Request, user: str | None = None) -> EventPump:
    """A slot for the question (or a 503 while draining, a 429 when full), and the engine running it with the
    question's routing key."""
    record = current_record()
    record.mode_requested = plan.mode
    if state.draining:
        record.rejected = "draining"
        raise draining_error(state.settings.retry_after)
    try:
        lease = state.gate.enter()
    except ApiError:
        record.rejected = "overloaded"
        raise
    key, _chosen = routing_key(request.headers, user, plan.messages, state.settings.routing_header)
    record.routing_key = key
    engine = plan.engine(state.get_engine())
    pump = EventPump(engine, plan.messages, plan.mode, lease, session=key, observer=record)
    pump.watch(request)
    state.track(pump)
    return pump


@api.post("/chat/completions", response_model=None, responses=CHAT_RESPONSES, tags=["openai"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State, x_sot_mode: ModeHeader = None
) -> Response:
    """Answer a conversation (OpenAI chat completions). The mode: `sot_mode` in the body, else the
    `X-SoT-Mode` header, else a model-name prefix (`sot:`, `normal:`, `auto:`), else the server default."""
    settings = state.settings
    plan = chat_plan(body, x_sot_mode, settings, served=state.get_engine().backend.model)
    current_record().stream = plan.stream
    pump = start(state, plan, request, body.user)
    if not plan.stream:
        return await complete(pump, plan, settings.retry_after)
    primed = await start_stream(pump, settings.retry_after)
    if isinstance(primed, Response):
        return primed
    chunks = chat_chunks(primed, pump, plan, settings.retry_after, settings.ping_seconds)
    return sse_response(chunks, pump, {"X-SoT-Mode": plan.mode})


@api.post("/sot/stream", response_model=None, responses=EVENT_STREAM_RESPONSES, tags=["sot"])
async def sot_stream(body: SoTStreamRequest, request: Request, state: State, x_sot_mode: ModeHeader = None) -> Response:
    """Answer one question and stream the engine's own events: the skeleton, each point's progress,
    fallbacks, and the final result with its statistics. The web page is a view of this stream."""
    settings = state.settings
    plan = events_plan(body, x_sot_mode, settings)
    current_record().stream = True
    pump = start(state, plan, request)
    primed = await start_stream(pump, settings.retry_after)
    if isinstance(primed, Response):
        return primed
    events = engine_events(primed, pump, settings.retry_after, settings.ping_seconds)
    return sse_response(events, pump, {"X-SoT-Mode": plan.mode})
