"""The `sot serve` web app: an OpenAI-compatible chat-completions API over the engine, its event stream, and the page.

Endpoints: `POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/sot/stream` (the engine's own events as SSE, which the page uses), `GET /health` and the page at `/`.
This module translates between the wire format and the engine and enforces the server's limits; it does no
orchestration of its own (that is `sot.engine`) and never starts a process (that is `sot.cli.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from sot.backends.base import Backend, Message
from sot.core.assemble import clean_point_text, format_point
from sot.engine import Engine
from sot.errors import (
    AuthenticationError,
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendStreamError,
    BackendTimeoutError,
    BadRequestError,
    InputError,
    RateLimitError,
)
from sot.events import (
    AnswerDelta,
    Done,
    ErrorEvent,
    Event,
    EventAdapter,
    Fallback,
    Mode,
    PointDelta,
    PointDone,
    PointStarted,
    Result,
    RouteDecided,
    RunStarted,
    SkeletonDelta,
    SkeletonDone,
)
from sot.server.openai_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SoTInfo,
    SoTStreamRequest,
    Usage,
)

log = logging.getLogger("sot.server")

MODES: tuple[Mode, ...] = ("sot", "normal", "auto")
STATIC_DIR = Path(__file__).parent / "static"
EngineSource = Engine | Backend | Callable[[], Engine]


@dataclass(frozen=True)
class ServerSettings:
    """Limits and defaults of one server. Every limit answers with a clear error rather than a hang."""

    api_key: str | None = None  # bearer token required on /v1/*; None: open
    default_mode: Mode = "sot"
    max_concurrency: int = 64  # questions being answered at once; beyond it: 429 + Retry-After
    retry_after: int = 1  # seconds, sent with every 429 the server itself decides
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_question_chars: int = 32_000  # all messages' text together
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    ping_seconds: float = 15.0  # SSE keep-alive comments, so proxies do not cut a long skeleton wait


# -- errors -----------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status and the OpenAI error object's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def map_error(exc: BaseException, settings: ServerSettings) -> ApiError:
    """The status and error object a client should see for a failure of the engine or its backend."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), code="invalid_input")
    if isinstance(exc, RateLimitError):
        wait = exc.retry_after if exc.retry_after is not None else settings.retry_after
        return ApiError(
            429,
            f"The model upstream is rate limiting us; retry later. ({exc.message})",
            type="rate_limit_error",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    if isinstance(exc, AuthenticationError):
        # The client's own key is fine; the server's key for the upstream is not: a gateway error.
        return ApiError(
            502,
            f"The model upstream refused the server's credentials. ({exc.message})",
            type="upstream_error",
            code="upstream_authentication_failed",
        )
    if isinstance(exc, BadRequestError):
        if exc.status_code == 404:
            return ApiError(
                502,
                f"The model upstream does not know the configured model. ({exc.message})",
                type="upstream_error",
                code="upstream_model_not_found",
            )
        return ApiError(400, f"The model upstream rejected the request. ({exc.message})", code="upstream_bad_request")
    if isinstance(exc, BackendTimeoutError):
        return ApiError(
            504, f"The model upstream timed out. ({exc.message})", type="upstream_error", code="upstream_timeout"
        )
    if isinstance(exc, BackendConnectionError):
        return ApiError(
            502,
            f"The model upstream could not be reached. ({exc.message})",
            type="upstream_error",
            code="upstream_unreachable",
        )
    if isinstance(exc, BackendStatusError | BackendStreamError):
        return ApiError(
            502, f"The model upstream failed. ({exc.message})", type="upstream_error", code="upstream_error"
        )
    if isinstance(exc, BackendError):
        return ApiError(500, f"The model backend failed. ({exc.message})", type="server_error", code="backend_error")
    log.error("unexpected error while answering", exc_info=exc)
    return ApiError(500, "The server had an error while processing the request.", type="server_error")


# -- request interpretation -------------------------------------------------------------------------------


def resolve_mode(body_mode: str | None, header: str | None, model: str, default: Mode) -> Mode:
    """The request's mode: `sot_mode` in the body, else the `X-SoT-Mode` header, else a model-name prefix
    (`sot:`, `normal:`, `auto:`, or the bare word), else the server default."""
    if body_mode is not None:
        return _as_mode(body_mode, "sot_mode")
    if header is not None and header.strip():
        return _as_mode(header, "X-SoT-Mode")
    prefix, sep, _ = model.partition(":")
    if sep and prefix.strip().lower() in MODES:
        return _as_mode(prefix, "model")
    if model.strip().lower() in MODES:
        return _as_mode(model, "model")
    return default


def _as_mode(value: str, param: str) -> Mode:
    name = value.strip().lower()
    for mode in MODES:
        if name == mode:
            return mode
    raise ApiError(
        400, f"{param}: unknown mode {value!r}; use one of sot, normal, auto", param=param, code="invalid_mode"
    )


def conversation(messages: Sequence[ChatMessage], settings: ServerSettings) -> list[Message]:
    """The engine's conversation for the request's messages, or a 400 saying what cannot be answered."""
    if len(messages) > settings.max_messages:
        raise ApiError(
            400,
            f"messages: {len(messages)} messages; this server accepts at most {settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    out: list[Message] = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function") or message.tool_calls:
            raise ApiError(
                400,
                f"messages[{i}]: tool and function calls are not supported by this server",
                param=f"messages[{i}]",
                code="unsupported_feature",
            )
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            kinds = {part.type for part in content if part.type != "text"}
            if kinds:
                raise ApiError(
                    400,
                    f"messages[{i}].content: only text content is supported, not {', '.join(sorted(kinds))}",
                    param=f"messages[{i}].content",
                    code="unsupported_content",
                )
            text = "".join(part.text or "" for part in content)
        role = "system" if message.role == "developer" else message.role
        assert role in ("system", "user", "assistant")
        out.append(Message(role, text))
    size = sum(len(m.content) for m in out)
    if size > settings.max_question_chars:
        raise ApiError(
            400,
            f"messages: {size:,} characters; this server accepts at most {settings.max_question_chars:,}",
            param="messages",
            code="context_length_exceeded",
        )
    if out[-1].role != "user":
        raise ApiError(
            400, "messages: the conversation must end with a user message", param="messages", code="invalid_input"
        )
    if not out[-1].content.strip():
        raise ApiError(400, "messages: the last user message is empty", param="messages", code="invalid_input")
    return out


def check_supported(body: ChatCompletionRequest) -> None:
    """A clear 400 for every field whose meaning this server cannot honour."""
    if body.n is not None and body.n > 1:
        raise ApiError(400, "n: only one choice per request is supported (n=1)", param="n", code="unsupported_value")
    if body.tools or body.functions:
        raise ApiError(
            400,
            "tools: tool and function calling is not supported by this server",
            param="tools",
            code="unsupported_feature",
        )
    if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
        raise ApiError(
            400,
            "tool_choice: tool calling is not supported by this server",
            param="tool_choice",
            code="unsupported_feature",
        )
    if body.function_call is not None and body.function_call != "none":
        raise ApiError(
            400,
            "function_call: function calling is not supported by this server",
            param="function_call",
            code="unsupported_feature",
        )
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400,
            f"response_format: only type 'text' is supported, not {body.response_format.type!r}",
            param="response_format",
            code="unsupported_value",
        )
    if body.logprobs or body.top_logprobs:
        raise ApiError(
            400,
            "logprobs: log probabilities are not supported by this server",
            param="logprobs",
            code="unsupported_feature",
        )
    if body.modalities and any(m != "text" for m in body.modalities):
        raise ApiError(400, "modalities: only text output is supported", param="modalities", code="unsupported_value")
    if body.audio is not None:
        raise ApiError(400, "audio: audio output is not supported", param="audio", code="unsupported_feature")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise ApiError(400, "stop: at most 4 stop sequences", param="stop", code="invalid_value")


def requested_max_tokens(values: Sequence[int | None], settings: ServerSettings, param: str) -> int | None:
    given = [v for v in values if v is not None]
    if not given:
        return None
    value = min(given)
    if value > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"{param}: {value} is more than this server allows ({settings.max_tokens_limit})",
            param=param,
            code="invalid_value",
        )
    return value


def request_engine(
    base: Engine,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    frequency_penalty: float | None = None,
) -> Engine:
    """An engine with this request's sampling on the shared backend (engines are cheap; backends are not).

    `max_tokens` bounds a normal answer; in SoT mode it bounds each point's expansion (the number of points
    is not known in advance, so the whole answer cannot be bounded without truncating it arbitrarily).
    """
    changes: dict[str, Any] = {}
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("frequency_penalty", frequency_penalty),
        ("max_tokens", max_tokens),
    ):
        if value is not None:
            changes[name] = value
    if not changes:
        return base
    config = dataclasses.replace(base.config, sampling=dataclasses.replace(base.config.sampling, **changes))
    if max_tokens is not None:
        config = dataclasses.replace(config, point_max_tokens=min(config.point_max_tokens, max_tokens))
    return Engine(base.backend, config, router=base.router)


# -- running the engine -----------------------------------------------------------------------------------


class Gate:
    """Counts questions in flight; a question beyond the limit is refused at once, never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self, settings: ServerSettings) -> Lease:
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"The server is answering {self.active} questions, its limit; retry in {settings.retry_after} s.",
                type="rate_limit_error",
                code="server_overloaded",
                headers={"Retry-After": str(settings.retry_after)},
            )
        self.active += 1
        return Lease(self)


class Lease:
    """One question's slot in the `Gate`; releasing twice is harmless (several cleanup paths may run)."""

    def __init__(self, gate: Gate) -> None:
        self._gate: Gate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.active -= 1
            self._gate = None


_END = object()


class EventPump:
    """Runs one engine stream in a task of its own and hands its events over through a queue.

    The stream is iterated by one task from start to end, whichever request task reads the events (the
    handler while it waits for the first event, then the SSE response's task): the engine's deadlines are
    task-bound. Closing the pump cancels that task, which closes the engine stream, which cancels every
    request of the question. The lease is released when the engine's work ends, however it ends.
    """

    def __init__(self, engine: Engine, messages: list[Message], mode: Mode, lease: Lease) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._run(engine, messages, mode))
        self._task.add_done_callback(lambda _: lease.release())

    async def _run(self, engine: Engine, messages: list[Message], mode: Mode) -> None:
        try:
            async with contextlib.aclosing(engine.stream(messages, mode)) as events:
                async for event in events:
                    self._queue.put_nowait(event)
        except Exception as exc:  # handed to the reader, who decides the status
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(_END)

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


async def start_stream(request: Request, pump: EventPump, settings: ServerSettings) -> list[Event] | Response:
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
        raise map_error(exc, settings) from exc


async def prime(pump: EventPump) -> list[Event]:
    """Events up to the first one that needed the backend to answer, so that a failure to even start
    (bad upstream key, rate limit, unreachable) becomes a proper HTTP status instead of a broken stream."""
    primed: list[Event] = []
    skeleton_deltas = 0
    while batch := await pump.next_batch():
        primed.extend(batch)
        for event in batch:
            if isinstance(event, RunStarted | RouteDecided | ErrorEvent):
                continue
            if isinstance(event, SkeletonDelta):
                skeleton_deltas += 1
                if skeleton_deltas == 1:
                    continue  # the first may be the prefill ("1."), sent before the backend said anything
            return primed
    return primed


async def batches(primed: list[Event], pump: EventPump) -> AsyncIterator[list[Event]]:
    """The primed events, then the pump's batches until the end."""
    if primed:
        yield primed
    while batch := await pump.next_batch():
        yield batch


# -- the answer text a standard client sees ---------------------------------------------------------------

_LEADING_MARKS = "*0123456789:：-–—"


def live_expansion(index: int, point: str, raw: str) -> str:
    """The cleaned text of a point still being written, once its start can no longer change; else "".

    The start of a reply may be an echo of the number and the point ("2. Eat greens: ..."), which cleaning
    removes; until enough has arrived to tell, showing any of it could show text the final answer drops.
    """
    probe = raw.replace("\r\n", "\n").lstrip()
    if not probe:
        return ""
    settled = len(probe) >= len(point) + 12
    if not settled:
        echo_possible = point.casefold().startswith(probe.casefold()) or probe.casefold().startswith(point.casefold())
        settled = probe[0] not in _LEADING_MARKS and not echo_possible
    return clean_point_text(index, point, raw) if settled else ""


class AnswerText:
    """Folds engine events into the answer a standard client reads, sent as a growing prefix of it.

    Normal mode: the answer as written (without the leading and trailing whitespace the engine strips).
    SoT mode: point 1 live as "1. <point>: <text>"; later points are held and each is sent as soon as every
    earlier point is done, so the text sent adds up to `Result.answer` exactly. Only text that cannot change
    is sent. The one case where that is impossible: SoT falls back to normal decoding after point 1 was
    already being sent (a point failed twice); the normal answer then follows after a blank line.
    """

    def __init__(self) -> None:
        self.sent = ""
        self._prefix = ""  # what was sent before a fallback to normal decoding
        self._points: list[str] = []
        self._raw: dict[int, str] = {}
        self._done: dict[int, str] = {}
        self._normal: list[str] = []
        self._sot = False
        self._head = 1  # the first point not done yet: the only one whose text can be sent live

    def feed(self, event: Event) -> str:
        """Text to send now because of `event` (often "")."""
        if isinstance(event, SkeletonDone):
            self._points, self._sot = list(event.points), True
        elif isinstance(event, PointStarted):
            self._raw[event.index] = ""  # a retry starts afresh
        elif isinstance(event, PointDelta):
            self._raw[event.index] = self._raw.get(event.index, "") + event.text
            if event.index != self._head:
                return ""  # held until every earlier point is done: nothing to send yet
        elif isinstance(event, PointDone):
            if event.error is None:
                self._done[event.index] = event.text
                while self._head in self._done:
                    self._head += 1
        elif isinstance(event, Fallback):
            self._sot = False
            self._prefix = self.sent + "\n\n" if self.sent else ""
            self._normal = []
        elif isinstance(event, AnswerDelta):
            self._normal.append(event.text)
        else:
            return ""
        return self._advance(self._candidate(), final=False)

    def finish(self, result: Result) -> str:
        """The rest of the answer once the engine is done."""
        return self._advance(self._prefix + result.answer, final=True)

    def _candidate(self) -> str:
        if not self._sot:
            body = "".join(self._normal).strip()
            return self._prefix + body if body else self._prefix.rstrip("\n")
        lines: list[str] = []
        for i, point in enumerate(self._points, start=1):
            if i in self._done:
                lines.append(format_point(i, point, self._done[i]))
                continue
            partial = live_expansion(i, point, self._raw.get(i, ""))
            if partial:
                lines.append(format_point(i, point, partial))
            break
        return "\n".join(lines)

    def _advance(self, candidate: str, *, final: bool) -> str:
        if candidate.startswith(self.sent):
            out = candidate[len(self.sent) :]
        elif final:
            out = "\n\n" + candidate  # cannot happen unless a retried point wrote different text
        else:
            return ""
        self.sent += out
        return out


class StopFilter:
    """Cuts the streamed text at the first of the request's `stop` strings (which are not sent)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        buffer = self._held + text
        found = [buffer.find(s) for s in self.stops if s in buffer]
        if found:
            self.hit, self._held = True, ""
            return buffer[: min(found)]
        # Hold back a tail that could be the start of a stop string.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.hit else out


def sot_info(result: Result) -> SoTInfo:
    """The `sot` object of a response (stats without the per-token times, which can be long)."""
    return SoTInfo(
        mode_requested=result.mode_requested,
        mode_used=result.mode_used,
        skeleton=result.skeleton,
        points=result.points,
        truncated_points=result.truncated_points,
        fallback_reason=result.fallback_reason,
        route=result.route.model_dump(mode="json") if result.route else None,
        backend=result.backend,
        model=result.model,
        stats=result.stats.model_dump(mode="json", exclude={"token_times"}),
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _sse(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE message, encoded here so that several can go out in one write (JSON has no raw newlines)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


# -- middleware -------------------------------------------------------------------------------------------


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server accepts ({limit:,} bytes).")


class BodyLimitMiddleware:
    """413 for a body over the limit, whether it announces its length or streams it (pure ASGI)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.limit
                except ValueError:
                    too_large = False
                if too_large:
                    error = ApiError(413, str(_BodyTooLarge(self.limit).detail), code="request_too_large")
                    await error.response()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> AsgiMessage:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI turns other exceptions raised while reading the body into a 400.
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


# -- the app ----------------------------------------------------------------------------------------------


@dataclass
class _State:
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


# One event of a chat-completions stream: a chunk as JSON, an error object, or the final "[DONE]".
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}

_BEARER = HTTPBearer(auto_error=False, description="The server's API key, when it was started with one.")


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    """The bearer-token check of /v1/* (a no-op when the server has no key)."""
    settings: ServerSettings = request.app.state.sot.settings
    if settings.api_key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer KEY'."
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid or unsupported request"),
        (401, "Missing or wrong API key"),
        (413, "Request body too large"),
        (429, "Too many questions in flight, or the upstream is rate limiting (see Retry-After)"),
        (500, "Server error"),
        (502, "The model upstream failed"),
        (504, "The model upstream timed out"),
    )
}


def create_app(source: EngineSource, settings: ServerSettings | None = None) -> FastAPI:
    """The server app over an engine, a backend, or a zero-argument factory of an engine.

    A backend, or the backend of an engine built by a factory, is the app's: it is closed at shutdown.
    An `Engine` passed in as such stays its owner's.
    """
    settings = settings or ServerSettings()
    state = _State(settings=settings, source=source, gate=Gate(settings.max_concurrency))
    owns_backend = not isinstance(source, Engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.get_engine()
        try:
            yield
        finally:
            if owns_backend and state.engine is not None:
                await state.engine.backend.aclose()

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
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The schema tells the truth about auth: without a key the bearer scheme is not required anywhere.
        schema = generate_openapi()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                # Invalid requests are 400s here (as OpenAI answers them), never FastAPI's 422.
                operation.get("responses", {}).pop("422", None)
                if settings.api_key is None:
                    operation.pop("security", None)
        if settings.api_key is None:
            schema.get("components", {}).pop("securitySchemes", None)
        # The event stream's data are the engine's events: publish their schemas beside the API's own.
        events = EventAdapter.json_schema(ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(events.pop("$defs", {}))
        schema["components"]["schemas"]["Event"] = events
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    # -- error handlers: every error is an OpenAI error object ------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        error = ApiError(
            exc.status_code, str(exc.detail), code=codes.get(exc.status_code), headers=dict(exc.headers or {})
        )
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return map_error(exc, settings).response()

    # -- endpoints ----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        engine = state.get_engine()
        return Health(
            backend=engine.backend.name,
            model=engine.backend.model,
            default_mode=settings.default_mode,
            auth=settings.api_key is not None,
            in_flight=state.gate.active,
            max_concurrency=settings.max_concurrency,
        )

    def model_cards() -> list[ModelCard]:
        model = state.get_engine().backend.model
        ids = [model, *(f"{mode}:{model}" for mode in MODES)]
        return [ModelCard(id=i, created=state.started, owned_by="sot") for i in ids]

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=_ERROR_RESPONSES,
        tags=["openai"],
        dependencies=[Depends(require_key)],
    )
    async def list_models() -> ModelList:
        return ModelList(data=model_cards())

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        responses={**_ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "No such model"}},
        tags=["openai"],
        dependencies=[Depends(require_key)],
    )
    async def get_model(model_id: str) -> ModelCard:
        for card in model_cards():
            if card.id == model_id:
                return card
        raise ApiError(
            404, f"The model {model_id!r} does not exist on this server.", param="model", code="model_not_found"
        )

    chat_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "The answer: JSON, or with `stream: true` an SSE stream of chunks ending in [DONE]",
            "model": ChatCompletion,
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        },
        **_ERROR_RESPONSES,
    }

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=chat_responses,
        tags=["openai"],
        dependencies=[Depends(require_key)],
    )
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        x_sot_mode: str | None = Header(default=None, description="sot, normal or auto"),
    ) -> Response:
        """Answer a conversation (OpenAI chat completions). The mode: `sot_mode` in the body, else the
        `X-SoT-Mode` header, else a model-name prefix (`sot:`, `normal:`, `auto:`), else the server default."""
        mode = resolve_mode(body.sot_mode, x_sot_mode, body.model, settings.default_mode)
        check_supported(body)
        messages = conversation(body.messages, settings)
        max_tokens = requested_max_tokens([body.max_tokens, body.max_completion_tokens], settings, "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        engine = request_engine(
            state.get_engine(),
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            frequency_penalty=body.frequency_penalty,
        )
        lease = state.gate.enter(settings)
        pump = EventPump(engine, messages, mode, lease)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_name = body.model or engine.backend.model
        headers = {"X-SoT-Mode": mode}
        if not body.stream:
            try:
                result = await unless_disconnected(request, _final_result(pump))
            except ClientGone:
                return Response(status_code=499)
            except Exception as exc:
                raise map_error(exc, settings) from exc
            finally:
                await pump.aclose()
            answer = result.answer
            finish = result.finish_reason
            if stops:
                cut = StopFilter(stops)
                answer = cut.push(answer) + cut.flush()
                finish = "stop" if cut.hit else finish
            completion = ChatCompletion(
                id=completion_id,
                created=created,
                model=model_name,
                choices=[Choice(message=AssistantMessage(content=answer), finish_reason=finish)],
                usage=_usage(result.stats.prompt_tokens, result.stats.completion_tokens),
                sot=sot_info(result),
            )
            headers["X-SoT-Mode-Used"] = result.mode_used
            return JSONResponse(completion.model_dump(mode="json"), headers=headers)

        primed = await start_stream(request, pump, settings)
        if isinstance(primed, Response):
            return primed
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "system_fingerprint": None,
                "choices": []
                if delta is None
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = None  # as OpenAI does: null on every chunk but the last
            out.update(extra)
            return out

        async def chunks() -> AsyncIterator[bytes]:
            text = AnswerText()
            cut = StopFilter(stops)
            result: Result | None = None
            deltas = 0
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                async for batch in batches(primed, pump):
                    out: list[bytes] = []
                    pieces: list[str] = []
                    for event in batch:
                        if body.sot_events:
                            if pieces:  # keep the order of text and events
                                out.append(_sse(chunk({"content": "".join(pieces)})))
                                pieces = []
                            out.append(_sse(chunk(None, sot_event=event.model_dump(mode="json"))))
                        if isinstance(event, ErrorEvent):
                            continue  # the exception follows
                        if isinstance(event, Done):
                            result = event.result
                            pieces.append(cut.push(text.finish(result)) + cut.flush())
                        else:
                            deltas += isinstance(event, AnswerDelta | PointDelta | SkeletonDelta)
                            pieces.append(cut.push(text.feed(event)))
                        if cut.hit:
                            break
                    if any(pieces):
                        out.append(_sse(chunk({"content": "".join(pieces)})))
                    if out:
                        yield b"".join(out)
                    if cut.hit:
                        break
            except Exception as exc:
                # Headers are out: report the failure in the stream, as OpenAI does (the SDK raises APIError).
                yield _sse(map_error(exc, settings).body())
                return
            finally:
                await pump.aclose()
            if result is not None:
                finish = "stop" if cut.hit else result.finish_reason
                tail = [_sse(chunk({}, finish, sot=sot_info(result).model_dump(mode="json")))]
                usage = _usage(result.stats.prompt_tokens, result.stats.completion_tokens)
            else:  # stopped at a stop string: the engine was cancelled, so count what was read
                tail = [_sse(chunk({}, "stop"))]
                usage = _usage(sum(len(m.content) for m in messages) // 4, deltas)
            if include_usage:
                last = chunk(None)
                last["usage"] = usage.model_dump()
                tail.append(_sse(last))
            tail.append(_sse("[DONE]"))
            yield b"".join(tail)

        return EventSourceResponse(
            chunks(),
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            ping=settings.ping_seconds,
            sep="\n",
            background=BackgroundTask(pump.aclose),
        )

    @app.post(
        "/v1/sot/stream",
        response_model=None,
        tags=["sot"],
        dependencies=[Depends(require_key)],
        responses={
            200: {
                "description": "The engine's events (`sot.events`) as SSE: `event: <type>`, `data: <json>`",
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["event", "data"],
                            "properties": {
                                "event": {"type": "string"},
                                "data": {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": "#/components/schemas/Event"},
                                },
                            },
                        }
                    }
                },
            },
            **_ERROR_RESPONSES,
        },
    )
    async def sot_stream(
        body: SoTStreamRequest,
        request: Request,
        x_sot_mode: str | None = Header(default=None, description="sot, normal or auto"),
    ) -> Response:
        """Answer one question and stream the engine's own events: the skeleton, each point's progress,
        fallbacks, and the final result with its statistics. The web page is a view of this stream."""
        mode = resolve_mode(body.mode, x_sot_mode, "", settings.default_mode)
        if body.messages is not None:
            if body.question is not None:
                raise ApiError(400, "give either question or messages, not both", param="question")
            messages = conversation(body.messages, settings)
        elif body.question is not None:
            messages = conversation([ChatMessage(role="user", content=body.question)], settings)
        else:
            raise ApiError(400, "question: give a question (or messages)", param="question")
        max_tokens = requested_max_tokens([body.max_tokens], settings, "max_tokens")
        engine = request_engine(
            state.get_engine(), max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
        )
        lease = state.gate.enter(settings)
        pump = EventPump(engine, messages, mode, lease)
        primed = await start_stream(request, pump, settings)
        if isinstance(primed, Response):
            return primed

        async def events() -> AsyncIterator[bytes]:
            last: Event | None = None
            try:
                async for batch in batches(primed, pump):
                    last = batch[-1]
                    yield b"".join(_sse(event.model_dump_json(), event.type) for event in batch)
            except Exception as exc:
                if not isinstance(last, ErrorEvent):
                    error = map_error(exc, settings)
                    payload = ErrorEvent(error=error.message, kind=type(exc).__name__)
                    yield _sse(payload.model_dump_json(), "error")
            finally:
                await pump.aclose()

        return EventSourceResponse(
            events(),
            headers={"X-SoT-Mode": mode, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            ping=settings.ping_seconds,
            sep="\n",
            background=BackgroundTask(pump.aclose),
        )

    return app


async def _final_result(pump: EventPump) -> Result:
    result: Result | None = None
    while batch := await pump.next_batch():
        for event in batch:
            if isinstance(event, Done):
                result = event.result
    if result is None:  # the engine contract: a stream that does not raise ends with Done
        raise RuntimeError("the engine ended without a result")
    return result
