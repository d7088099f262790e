"""What one HTTP request did, recorded as it happens: its request id, the mode asked for, the engine's result or
failure, and the HTTP status; the middleware that records it and hands it to the metrics and the access log."""

from __future__ import annotations

import contextvars
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from sot.events import AnswerDelta, Done, Event, Result

REQUEST_ID_HEADER = "X-Request-ID"
# The endpoints that answer questions: what the request metrics count, valid or not.
QUESTIONS = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/sot/stream")})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

# The record of the request being answered: the handler, the engine's tasks and the upstream client see it.
_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("sot_request", default=None)


def request_id(given: str | None) -> str:
    """The client's `X-Request-ID` when it is a sane token (at most 128 characters), else a new one."""
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    """One HTTP request, filled in by whoever learns something about it."""

    request_id: str
    method: str = "GET"
    path: str = "/"
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    status: int | None = None
    question: bool = False  # an answer endpoint (chat completions, the event stream)
    mode_requested: str | None = None
    stream: bool | None = None
    routing_key: str | None = None
    rejected: str | None = None  # "overloaded" (429) or "draining" (503): the server's own refusals
    error_code: str | None = None  # the error the engine's run ended in, as the client got it
    stopped: bool = False  # the stream was cut at a stop string (its engine run was cancelled on purpose)
    first_answer: float | None = None  # monotonic time of the first answer text
    result: Result | None = None
    duration: float = 0.0

    def see(self, event: Event) -> None:
        """An engine event of this request's run."""
        if isinstance(event, AnswerDelta) and self.first_answer is None and event.text:
            self.first_answer = time.monotonic()
        elif isinstance(event, Done):
            self.result = event.result

    def failed(self, code: str | None) -> None:
        """The run ended in an error (the error object's code)."""
        self.error_code = code or "error"

    @property
    def outcome(self) -> str:
        """ok, error, rejected, invalid (a 4xx of the request's own making) or cancelled (the client left)."""
        status = self.status or 500
        if self.rejected:
            return "rejected"
        if self.error_code is not None or status >= 500 or status == 429:
            return "error"
        if status == 499:
            return "cancelled"
        if status >= 400:
            return "invalid"
        if self.question and self.result is None and not self.stopped:
            return "cancelled"
        return "ok"


def current_record() -> RequestRecord:
    """The record of the request being answered (a throwaway one outside a request)."""
    record = _current.get()
    return record if record is not None else RequestRecord(request_id="-")


def current_request_id() -> str | None:
    """The id of the request being answered, if any (forwarded upstream as `X-Request-ID`)."""
    record = _current.get()
    return record.request_id if record is not None else None


Finish = Callable[[RequestRecord], None]


class ObserveMiddleware:
    """Gives every request a record and an id (the client's `X-Request-ID`, else a new one), returns the id in
    the response headers, and hands the finished record to `finish` (metrics, access log). Pure ASGI: the
    handler, the engine's tasks and the upstream client run in the context it sets."""

    def __init__(self, app: ASGIApp, finish: Finish) -> None:
        self.app = app
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        record = RequestRecord(request_id(given), method=method, path=path, question=(method, path) in QUESTIONS)
        token = _current.set(record)

        async def send_with_id(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, record.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
            record.duration = time.monotonic() - record.started
            self.finish(record)


def fallback_kind(reason: str | None) -> str | None:
    """A fallback reason in one of a few words, for a metric label: skeleton_failed, too_few_points,
    point_failed or other (None when there was no fallback)."""
    if reason is None:
        return None
    if reason.startswith("the skeleton request failed"):
        return "skeleton_failed"
    if reason.startswith("the skeleton had"):
        return "too_few_points"
    if reason.startswith("point "):
        return "point_failed"
    return "other"
