"""A local OpenAI-compatible chat server with scripted answers, timing and faults, for tests and benchmarks.

Run it as a real process: ``python -m sot.testing.upstream --port N [options]``. It binds 127.0.0.1 only
and, once its socket is listening, prints one line ``sot test upstream listening on http://127.0.0.1:PORT/v1``
(``--port 0`` lets the OS pick a free port; read it from that line).

Answers are deterministic functions of the request, shaped so both SoT stages get something usable:

- *skeleton* request: the system messages or the last user message mention "skeleton" or "outline" (and
  no particular point is being expanded). Answer: a numbered list of ``skeleton_points`` short points,
  ``1. Point one about <word>\\n2. Point two about <word>...``, the words taken from the question.
- *point* request: the last user message names a point ("point 3"), or the reply being continued is a
  numbered point with text ("3. Use caching"), or the last user message says "point", or the last message
  is an assistant message being continued. Answer: ``tokens_per_answer`` tokens of prose.
- anything else is a *full* answer: ``tokens_per_answer * full_answer_factor`` tokens of prose.

A token is one word plus its trailing whitespace, and a stream carries one token per chunk. When the last
message is from the assistant, the answer continues it and does not repeat it. ``max_tokens`` (or
``max_completion_tokens``) caps the answer (finish_reason "length"); ``stop`` strings end it early
(finish_reason "stop"). Unknown request fields are accepted and ignored.

Each request waits ``ttft`` seconds for its first token, then emits ``tokens_per_second``; requests are
timed independently (asyncio sleeps only), so concurrent requests do not slow each other.

Per-request overrides: a JSON body field ``sot_test`` (an object), and the headers ``X-Test-Fault: NAME``
and ``X-Test-Options: {json object}``; the body field wins over the headers. Keys: ``points`` (alias of
``skeleton_points``), ``tokens`` (exact length of this prose answer), ``kind`` ("skeleton", "point",
"full"), and ``tokens_per_answer``, ``full_answer_factor``, ``ttft``, ``tokens_per_second``, ``fault``,
``fault_rate``, ``fault_after``, ``retry_after``. Unknown keys are a 400, so typos do not pass silently.

Faults (server-wide ``--fault`` for a fraction ``--fault-rate`` of requests, or for the first
``--fault-first`` requests; or per request):

- ``429``: HTTP 429 with ``Retry-After`` and an OpenAI error object; ``401``, ``500`` and any other
  HTTP status from 400 to 599 likewise (without Retry-After).
- ``stall``: streams headers and the first (role) chunk, then sends nothing until the client goes away;
  a non-stream request never gets a response.
- ``cut``: the stream ends cleanly after ``fault_after`` tokens, with no finish_reason and no [DONE]; a
  non-stream request gets those tokens with ``finish_reason: null``.
- ``error-mid-stream``: after ``fault_after`` tokens the stream carries ``data: {"error": {...}}`` and
  ends; a non-stream request gets HTTP 500 instead.
- ``none``: no fault (switches a server-wide fault off for one request).

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /stats`` (counters
and recent requests, so tests can check that a client cancelled what it abandoned), ``POST /stats/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

HOST = "127.0.0.1"
DEFAULT_MODEL = "sot-test-model"
READY_LINE_PREFIX = "sot test upstream listening on "
FAULTS = ("429", "500", "401", "stall", "cut", "error-mid-stream")
KINDS = ("skeleton", "point", "full")
Kind = Literal["skeleton", "point", "full"]

_FINGERPRINT = "fp_sot_test"
_RECENT_LIMIT = 500


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    """Server-wide behaviour. All but `model`, `fault_first` and `seed` can be overridden per request."""

    model: str = DEFAULT_MODEL
    skeleton_points: int = 5
    tokens_per_answer: int = 60
    full_answer_factor: float = 3.0
    ttft: float = 0.05
    # <= 0 or inf means "no delay between tokens".
    tokens_per_second: float = 50.0
    fault: str | None = None
    fault_rate: float = 1.0
    # When > 0, exactly the first K requests get `fault` and `fault_rate` is ignored.
    fault_first: int = 0
    # Only requests of this kind ("skeleton", "point", "full") can get the fault; None: any request.
    fault_kind: str | None = None
    fault_after: int = 3
    retry_after: int = 1
    seed: int = 0


class _BadRequest(Exception):
    """A malformed request; answered with HTTP 400 and an OpenAI error object."""


# ---------------------------------------------------------------------------------------------------------
# Per-request overrides
# ---------------------------------------------------------------------------------------------------------

_OVERRIDABLE: dict[str, type] = {
    "skeleton_points": int,
    "tokens_per_answer": int,
    "full_answer_factor": float,
    "ttft": float,
    "tokens_per_second": float,
    "fault": str,
    "fault_rate": float,
    "fault_after": int,
    "retry_after": int,
}
_ALIASES = {"points": "skeleton_points"}


@dataclass(frozen=True, slots=True)
class _Overrides:
    """What one request asked to change."""

    options: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    kind: Kind | None = None


def normalize_fault(value: object) -> str | None:
    """A fault name as used internally (None for no fault); raises ValueError for an unknown one."""
    if value is None:
        return None
    name = str(value).strip().lower()
    if name in ("", "none", "off"):
        return None
    if name in FAULTS or (name.isdigit() and 400 <= int(name) <= 599):
        return name
    raise ValueError(f"unknown fault {value!r}; expected one of {', '.join(FAULTS)}, none, or an HTTP status")


def _coerce(key: str, kind: type, value: object) -> Any:
    # bool is an int subclass; {"tokens": true} is a mistake, not 1.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _BadRequest(f"sot_test.{key} must be >= 0")
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise _BadRequest(f"sot_test.{key} must be >= 0")
        return float(value)
    if kind is str and (value is None or isinstance(value, str | int)):
        return value
    raise _BadRequest(f"sot_test.{key} has the wrong type ({type(value).__name__})")


def _parse_overrides(body_field: object, header_fault: str | None, header_options: str | None) -> _Overrides:
    merged: dict[str, object] = {}
    if header_fault is not None:
        merged["fault"] = header_fault
    if header_options:
        try:
            parsed = json.loads(header_options)
        except ValueError as exc:
            raise _BadRequest("X-Test-Options is not valid JSON") from exc
        if not isinstance(parsed, dict):
            raise _BadRequest("X-Test-Options must be a JSON object")
        merged.update(parsed)
    if body_field is not None:
        if not isinstance(body_field, dict):
            raise _BadRequest("sot_test must be an object")
        merged.update(body_field)

    options: dict[str, Any] = {}
    tokens: int | None = None
    kind: Kind | None = None
    for raw_key, value in merged.items():
        key = str(raw_key).replace("-", "_")
        key = _ALIASES.get(key, key)
        if key == "tokens":
            tokens = _coerce(key, int, value)
        elif key == "kind":
            if value not in KINDS:
                raise _BadRequest(f"sot_test.kind must be one of {', '.join(KINDS)}")
            kind = value  # type: ignore[assignment]
        elif key in _OVERRIDABLE:
            options[key] = _coerce(key, _OVERRIDABLE[key], value)
        else:
            raise _BadRequest(f"unknown sot_test field {raw_key!r}")
    if "fault" in options:
        try:
            # Keep the key even for "none": an explicit "no fault" beats the server-wide one.
            options["fault"] = normalize_fault(options["fault"])
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
    if "fault_rate" in options and options["fault_rate"] > 1:
        raise _BadRequest("sot_test.fault_rate must be between 0 and 1")
    return _Overrides(options=options, tokens=tokens, kind=kind)


# ---------------------------------------------------------------------------------------------------------
# Deterministic answers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Msg:
    role: str
    content: str


_POINT_REF = re.compile(r"\bpoint\s*#?\s*\d+")
# The reply being continued ends with a numbered point that already has text: "3. Use caching".
_NUMBERED_PREFILL = re.compile(r"(?:^|\n)\s*\d+\.[ \t]*\S[^\n]*$")
_TRAILING_NUMBER = re.compile(r"(\d+)\.[ \t]*$")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
_QUESTION = re.compile(r"[^.?!\n]*\?")
_TOKEN = re.compile(r"\s*\S+\s*")

_NUMBER_WORDS = (  # noqa: SIM905 (a split string reads better than a 21-line literal)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

# Template words of typical SoT prompts and common function words: never a point's topic.
_STOPWORDS = frozenset(
    """
    about above after again also answer answers another because been before being below between both
    briefly brief could does doing done each either else every explain following from give given have
    having here into just know list make many more most much must need only other ought outline over
    please point points provide question questions really same should shall skeleton some such than that
    their them then there these they thing things this those through very want what when where which
    while whom whose with within without would write writing your yours continue continuing expand
    expanding short sentence sentences words numbered number answering organizer responsible content
    full
    """.split()  # noqa: SIM905
)

_SENTENCES = (
    "{T} matters because it shapes the rest of the answer.",
    "A careful look at {t} shows where the real tradeoffs are.",
    "In practice, {t} works best when it is kept simple and measured.",
    "Most problems with {t} come from skipping the basics.",
    "Start small with {t}, check the results, and adjust as you go.",
)


def _number_word(i: int) -> str:
    return _NUMBER_WORDS[i] if 0 <= i < len(_NUMBER_WORDS) else str(i)


def _topics(text: str) -> list[str]:
    """Content words of the question: the last sentence ending in '?' if there is one, else the text."""
    questions = _QUESTION.findall(text)
    source = questions[-1] if questions else text
    words = (w.lower().strip("'-") for w in _WORD.findall(source))
    topics = list(dict.fromkeys(w for w in words if len(w) > 3 and w not in _STOPWORDS))
    if not topics and questions:
        return _topics(text.replace("?", "."))
    return topics or ["the topic"]


def _word_count(text: str) -> int:
    return len(text.split())


def classify(messages: Sequence[_Msg]) -> Kind:
    """Which SoT stage a conversation looks like (see the module docstring for the rules)."""
    last = messages[-1]
    prefill = last.content if last.role == "assistant" else ""
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "").lower()
    if _POINT_REF.search(last_user) or _NUMBERED_PREFILL.search(prefill):
        return "point"
    instructions = " ".join(m.content for m in messages if m.role in ("system", "developer")).lower()
    if any(marker in f"{instructions}\n{last_user}" for marker in ("skeleton", "outline")):
        return "skeleton"
    if "point" in last_user or last.role == "assistant":
        return "point"
    return "full"


def _tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _skeleton_text(topics: list[str], points: int, prefill: str) -> str:
    lines = [f"{i}. Point {_number_word(i)} about {topics[(i - 1) % len(topics)]}" for i in range(1, points + 1)]
    if not prefill:
        return "\n".join(lines)
    trailing = _TRAILING_NUMBER.search(prefill)
    if trailing:
        # The reply stops right after "k." (typically the "1." prefill): continue from point k's text.
        k = int(trailing.group(1))
        rest = lines[k - 1 :] if 1 <= k <= points else []
        if not rest:
            return ""
        first = rest[0].split(" ", 1)[1]
        lead = "" if prefill[-1].isspace() else " "
        return lead + "\n".join([first, *rest[1:]])
    full = "\n".join(lines)
    if full.startswith(prefill):
        return full[len(prefill) :]
    return ("" if prefill.endswith("\n") else "\n") + full


def _prose_words(topics: list[str], n: int) -> list[str]:
    words: list[str] = []
    j = 0
    while len(words) < n:
        topic = topics[j % len(topics)]
        sentence = _SENTENCES[j % len(_SENTENCES)].format(t=topic, T=topic[:1].upper() + topic[1:])
        words.extend(sentence.split())
        j += 1
    words = words[:n]
    if words and not words[-1].endswith((".", "!", "?")):
        words[-1] = words[-1].rstrip(",;:") + "."
    return words


def _prose_tokens(topics: list[str], n: int, prefill: str) -> list[str]:
    words = _prose_words(topics, n)
    tokens = [w + " " for w in words[:-1]] + words[-1:]
    if tokens and prefill and not prefill[-1].isspace():
        tokens[0] = " " + tokens[0]
    return tokens


def _apply_stop(tokens: list[str], stops: Sequence[str]) -> tuple[list[str], bool]:
    """Tokens up to (not including) the first stop string, and whether one was found."""
    text = "".join(tokens)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return tokens, False
    cut = min(hits)
    out: list[str] = []
    pos = 0
    for token in tokens:
        if pos + len(token) <= cut:
            out.append(token)
            pos += len(token)
            continue
        if cut > pos:
            out.append(token[: cut - pos])
        break
    return out, True


@dataclass(frozen=True, slots=True)
class _Plan:
    """The whole answer of one request, decided up front."""

    kind: Kind
    tokens: list[str]
    finish_reason: str


def plan_answer(
    messages: Sequence[_Msg],
    options: UpstreamOptions,
    *,
    tokens: int | None = None,
    kind: Kind | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
) -> _Plan:
    """The deterministic answer to a conversation, as tokens, with its finish reason."""
    kind = kind or classify(messages)
    last = messages[-1]
    prefill = last.content if last.role == "assistant" else ""
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    if kind == "skeleton":
        answer = _tokenize(_skeleton_text(_topics(last_user), options.skeleton_points, prefill))
    else:
        if tokens is None:
            tokens = options.tokens_per_answer
            if kind == "full":
                tokens = round(tokens * options.full_answer_factor)
        numbered = _NUMBERED_PREFILL.search(prefill)
        topics = _topics(numbered.group(0)) if numbered else _topics(last_user)
        answer = _prose_tokens(topics, tokens, prefill)
    answer, _ = _apply_stop(answer, stop)
    # A stop string and max_tokens both end the answer; whichever comes first decides the reason.
    if max_tokens is not None and len(answer) > max_tokens:
        return _Plan(kind, answer[:max_tokens], "length")
    return _Plan(kind, answer, "stop")


# ---------------------------------------------------------------------------------------------------------
# Request bookkeeping
# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One chat completion request, as /stats reports it. Times are Unix timestamps (time.time())."""

    id: str
    index: int
    kind: str
    stream: bool
    fault: str | None
    model: str
    max_tokens: int | None
    prompt_tokens: int
    prompt_cache_key: str | None
    last_user: str
    started_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    # active -> finished (we sent the whole response, faulty or not) | cancelled (the client went away
    # first) | failed (a bug in this server).
    status: str = "active"
    http_status: int = 200
    completion_tokens: int = 0
    finish_reason: str | None = None


class UpstreamState:
    """Counters, recent requests and the fault dice of one server."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        # Response ids stay unique across resets.
        self.ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        """Forget all requests; `fault_first` and the fault dice start over too."""
        self._rng = random.Random(self.options.seed)
        self.started = 0
        self.eligible = 0  # requests of the kind that --fault-kind allows
        self.finished = 0
        self.cancelled = 0
        self.failed = 0
        self.faulted = 0
        self.max_active = 0
        self.recent: deque[RequestRecord] = deque(maxlen=_RECENT_LIMIT)

    @property
    def active(self) -> int:
        return self.started - self.finished - self.cancelled - self.failed

    def choose_fault(self, index: int, overrides: Mapping[str, Any]) -> str | None:
        """The fault for the `index`-th request (0-based): its own choice first, else the server's."""
        if "fault" in overrides:
            fault: str | None = overrides["fault"]
            rate = overrides.get("fault_rate", 1.0)
        else:
            fault = self.options.fault
            if fault is None:
                return None
            if self.options.fault_first > 0:
                return fault if index < self.options.fault_first else None
            rate = overrides.get("fault_rate", self.options.fault_rate)
        if fault is None or rate <= 0:
            return None
        return fault if rate >= 1 or self._rng.random() < rate else None

    def begin(self, record: RequestRecord) -> None:
        self.started += 1
        if record.fault is not None:
            self.faulted += 1
        self.recent.append(record)
        self.max_active = max(self.max_active, self.active)

    def end(self, record: RequestRecord, status: str) -> None:
        if record.status != "active":
            return
        record.status = status
        record.ended_at = time.time()
        if status == "finished":
            self.finished += 1
        elif status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "active": self.active,
            "max_active": self.max_active,
            "faulted": self.faulted,
            "requests": [asdict(r) for r in self.recent],
        }


# ---------------------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------------------


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _status_error(status: int, retry_after: int) -> JSONResponse:
    headers: dict[str, str] = {}
    if status == 429:
        body = error_body("Rate limit reached (simulated by the sot test upstream).", "requests", "rate_limit_exceeded")
        headers["Retry-After"] = str(retry_after)
    elif status == 401:
        body = error_body(
            "Incorrect API key provided (simulated by the sot test upstream).",
            "invalid_request_error",
            "invalid_api_key",
        )
    elif status >= 500:
        body = error_body(
            "The server had an error while processing your request (simulated by the sot test upstream).",
            "server_error",
        )
    else:
        body = error_body(f"Simulated HTTP {status} from the sot test upstream.", "invalid_request_error")
    return JSONResponse(body, status_code=status, headers=headers)


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)


def _sse(data: Mapping[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    # Always yield, so a zero-delay answer cannot hog the loop.
    await asyncio.sleep(max(delay, 0.0))


async def _forever() -> None:
    await asyncio.Event().wait()


def _parse_messages(raw: object) -> list[_Msg]:
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("messages must be a non-empty list")
    messages: list[_Msg] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _BadRequest("each message must be an object with a role")
        content = item.get("content")
        if isinstance(content, list):
            # Content parts: keep the text ones.
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _BadRequest("message content must be a string or a list of parts")
        messages.append(_Msg(item["role"], content))
    return messages


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _BadRequest(f"{key} must be a non-negative integer")
    return value


def _stop_strings(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _BadRequest("stop must be a string or a list of strings")


class _Generation(Response):
    """Runs one answer while watching for the client going away, and records how it ended."""

    def __init__(self, state: UpstreamState, record: RequestRecord, produce: Callable[[Send], Awaitable[None]]) -> None:
        super().__init__()
        self._state = state
        self._record = record
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False

        async def tracked_send(message: AsgiMessage) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        async def client_gone() -> None:
            # The body has been read already, so the next event is the disconnect (or the end of our
            # response, which the server also reports as a disconnect).
            while (await receive())["type"] != "http.disconnect":
                pass

        producer = asyncio.ensure_future(self._produce(tracked_send))
        watcher = asyncio.ensure_future(client_gone())
        status = "cancelled"
        error: BaseException | None = None
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done() and not producer.cancelled() and producer.exception() is not None:
                status, error = "failed", producer.exception()
            elif complete:
                status = "finished"
        finally:
            for task in (producer, watcher):
                task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            self._state.end(self._record, status)
        if error is not None:
            raise error


# ---------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    state: UpstreamState = request.app.state.upstream
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        body = await request.json()
    except ValueError:
        return _bad_request("The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _bad_request("The request body must be a JSON object.")
    try:
        overrides = _parse_overrides(
            body.get("sot_test"), request.headers.get("x-test-fault"), request.headers.get("x-test-options")
        )
        messages = _parse_messages(body.get("messages"))
        caps = [
            v
            for v in (_optional_int(body, "max_tokens"), _optional_int(body, "max_completion_tokens"))
            if v is not None
        ]
        max_tokens = min(caps) if caps else None
        stop = _stop_strings(body.get("stop"))
        stream = bool(body.get("stream", False))
        stream_options = body.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    except _BadRequest as exc:
        return _bad_request(str(exc))

    options = replace(state.options, **{k: v for k, v in overrides.options.items() if k != "fault"})
    requested_model = body.get("model")
    model = requested_model if isinstance(requested_model, str) and requested_model else options.model
    plan = plan_answer(
        messages, options, tokens=overrides.tokens, kind=overrides.kind, max_tokens=max_tokens, stop=stop
    )
    index = state.started
    fault = None
    if options.fault_kind is None or options.fault_kind == plan.kind or "fault" in overrides.options:
        # --fault-first counts only the requests that may get the fault.
        fault = state.choose_fault(state.eligible, overrides.options)
        state.eligible += 1
    prompt_tokens = sum(_word_count(m.content) for m in messages)
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    cache_key = body.get("prompt_cache_key")
    record = RequestRecord(
        id=f"chatcmpl-sottest{next(state.ids):06d}",
        index=index,
        kind=plan.kind,
        stream=stream,
        fault=fault,
        model=model,
        max_tokens=max_tokens,
        prompt_tokens=prompt_tokens,
        prompt_cache_key=cache_key if isinstance(cache_key, str) else None,
        last_user=last_user[:200],
        started_at=time.time(),
    )
    state.begin(record)

    if fault is not None and fault.isdigit():
        record.http_status = int(fault)
        state.end(record, "finished")
        return _status_error(int(fault), options.retry_after)

    created = int(time.time())
    tps = options.tokens_per_second
    interval = 1.0 / tps if tps > 0 and math.isfinite(tps) else 0.0
    broken = fault in ("cut", "error-mid-stream")
    emitted = plan.tokens[: options.fault_after] if broken else plan.tokens

    def usage() -> dict[str, int]:
        done = record.completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": done,
            "total_tokens": prompt_tokens + done,
        }

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": record.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            out["usage"] = None
        return out

    mid_stream_error = error_body(
        "The model stopped unexpectedly (simulated by the sot test upstream).",
        "server_error",
        "simulated_mid_stream_error",
    )

    async def produce_stream(send: Send) -> None:
        await _sleep_until(t0 + options.ttft)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send(
            {
                "type": "http.response.body",
                "body": _sse(chunk({"role": "assistant", "content": ""})),
                "more_body": True,
            }
        )
        record.first_token_at = time.time()
        if fault == "stall":
            await _forever()
        for i, token in enumerate(emitted):
            if i:
                await _sleep_until(t0 + options.ttft + i * interval)
            await send({"type": "http.response.body", "body": _sse(chunk({"content": token})), "more_body": True})
            record.completion_tokens += 1
        if fault == "cut":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if fault == "error-mid-stream":
            await send({"type": "http.response.body", "body": _sse(mid_stream_error), "more_body": False})
            return
        tail = _sse(chunk({}, plan.finish_reason))
        if include_usage:
            tail += _sse({**chunk({}), "choices": [], "usage": usage()})
        record.finish_reason = plan.finish_reason
        await send({"type": "http.response.body", "body": tail + _sse("[DONE]"), "more_body": False})

    async def produce_json(send: Send) -> None:
        if fault == "stall":
            await _forever()
        await _sleep_until(t0 + options.ttft + max(len(emitted) - 1, 0) * interval)
        record.first_token_at = time.time()
        if fault == "error-mid-stream":
            record.http_status = 500
            payload: dict[str, Any] = mid_stream_error
            status = 500
        else:
            record.completion_tokens = len(emitted)
            record.finish_reason = None if fault == "cut" else plan.finish_reason
            payload = {
                "id": record.id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(emitted), "refusal": None},
                        "logprobs": None,
                        "finish_reason": record.finish_reason,
                    }
                ],
                "usage": usage(),
            }
            status = 200
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    return _Generation(state, record, produce_stream if stream else produce_json)


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models."""
    state: UpstreamState = request.app.state.upstream
    model = {"id": state.options.model, "object": "model", "created": 0, "owned_by": "sot-testing"}
    return JSONResponse({"object": "list", "data": [model]})


async def health(request: Request) -> JSONResponse:
    """GET /health."""
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> JSONResponse:
    """GET /stats."""
    state: UpstreamState = request.app.state.upstream
    return JSONResponse(state.snapshot())


async def reset_stats(request: Request) -> JSONResponse:
    """POST /stats/reset."""
    state: UpstreamState = request.app.state.upstream
    state.reset()
    return JSONResponse({"status": "ok"})


def create_app(options: UpstreamOptions | None = None) -> Starlette:
    """The ASGI app; its state lives in `app.state.upstream` (an `UpstreamState`)."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/stats/reset", reset_stats, methods=["POST"]),
        ]
    )
    app.state.upstream = UpstreamState(options or UpstreamOptions())
    return app


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _fault_arg(value: str) -> str | None:
    try:
        return normalize_fault(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _rate_arg(value: str) -> float:
    rate = float(value)
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return rate


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sot.testing.upstream`."""
    defaults = UpstreamOptions()
    p = argparse.ArgumentParser(
        prog="python -m sot.testing.upstream",
        description="A local OpenAI-compatible test upstream with scripted answers, timing and faults.",
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick a free one; default 0)")
    p.add_argument("--model", default=defaults.model, help="model id reported by /v1/models")
    p.add_argument("--skeleton-points", type=int, default=defaults.skeleton_points, help="points in a skeleton")
    p.add_argument("--tokens-per-answer", type=int, default=defaults.tokens_per_answer, help="tokens in a point answer")
    p.add_argument(
        "--full-answer-factor",
        type=float,
        default=defaults.full_answer_factor,
        help="a full (non-SoT) answer is this many times --tokens-per-answer",
    )
    p.add_argument("--ttft", type=float, default=defaults.ttft, help="seconds to the first token")
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=defaults.tokens_per_second,
        help="token rate of each request (0: no delay)",
    )
    p.add_argument("--fault", type=_fault_arg, default=None, help=f"one of {', '.join(FAULTS)}, or an HTTP status")
    p.add_argument("--fault-rate", type=_rate_arg, default=defaults.fault_rate, help="fraction of faulty requests")
    p.add_argument("--fault-first", type=int, default=defaults.fault_first, help="fault exactly the first K requests")
    p.add_argument(
        "--fault-kind",
        choices=["skeleton", "point", "full"],
        default=None,
        help="only requests of this kind can get the fault (default: any)",
    )
    p.add_argument(
        "--fault-after",
        type=int,
        default=defaults.fault_after,
        help="tokens sent before a cut or mid-stream error",
    )
    p.add_argument("--retry-after", type=int, default=defaults.retry_after, help="Retry-After of a 429, seconds")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the --fault-rate dice")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def options_from_args(args: argparse.Namespace) -> UpstreamOptions:
    """The `UpstreamOptions` a parsed command line asks for."""
    return UpstreamOptions(
        model=args.model,
        skeleton_points=args.skeleton_points,
        tokens_per_answer=args.tokens_per_answer,
        full_answer_factor=args.full_answer_factor,
        ttft=args.ttft,
        tokens_per_second=args.tokens_per_second,
        fault=args.fault,
        fault_rate=args.fault_rate,
        fault_first=args.fault_first,
        fault_kind=args.fault_kind,
        fault_after=args.fault_after,
        retry_after=args.retry_after,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve on 127.0.0.1 until interrupted (SIGINT/SIGTERM)."""
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    # Bind here rather than in uvicorn so `--port 0` works: we know the port before serving and announce it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, args.port))
    sock.listen(256)
    port = sock.getsockname()[1]
    print(f"{READY_LINE_PREFIX}http://{HOST}:{port}/v1", flush=True)
    config = uvicorn.Config(
        create_app(options),
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="off",
        # Stalled streams never end on their own; do not let them hold up shutdown for long.
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
