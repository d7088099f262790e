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

``tokens_jitter`` (a fraction, default 0) varies the length of prose answers for load benchmarks: each is
``round(length * f)`` tokens (at least 1) with ``f`` in ``[1 - jitter, 1 + jitter]``, a function of ``seed``
and the messages only, so the same request always gets the same length. ``tokens`` (below) is exact.

``--replay RESULTS`` replays real answers' lengths from a `sot eval run` results file (`sot.testing.replay`):
a request whose user message holds one of its questions gets that question's normal-answer tokens (full),
skeleton points and tokens (skeleton) or point tokens (point); ``tokens`` (below) still wins.

A token is one word plus its trailing whitespace, and a stream carries one token per chunk. When the last
message is from the assistant, the answer continues it and does not repeat it. ``max_tokens`` (or
``max_completion_tokens``) caps the answer (finish_reason "length"); ``stop`` strings end it early
(finish_reason "stop"). Unknown request fields are accepted and ignored.

Timing: a stream's headers go out at once; the role chunk and the first token ``ttft`` seconds after the
request arrived, then ``tokens_per_second``. Token ``i`` is due ``ttft + i / tokens_per_second`` after
arrival (absolute deadlines: a late wake-up sends the overdue tokens together rather than delaying all the
later ones). Requests are timed independently (asyncio timers only), so concurrent requests do not slow
each other. A non-stream answer arrives whole when its last token would have.

Per-request overrides: a JSON body field ``sot_test`` (an object), and the headers ``X-Test-Fault: NAME``
and ``X-Test-Options: {json object}``; the body field wins over the headers. Keys: ``points`` (alias of
``skeleton_points``), ``tokens`` (exact length of this prose answer), ``kind`` ("skeleton", "point",
"full"), and ``tokens_per_answer``, ``full_answer_factor``, ``tokens_jitter``, ``ttft``,
``tokens_per_second``, ``fault``, ``fault_rate``, ``fault_after``, ``retry_after``. Unknown keys are a 400,
so typos do not pass silently.

Faults (server-wide ``--fault`` for a fraction ``--fault-rate`` of requests, or for the first
``--fault-first`` requests, optionally only of one ``--fault-kind``; or per request):

- ``429``: HTTP 429 with ``Retry-After: <retry_after>`` (seconds; fractions allowed, "0.5") and an OpenAI
  error object; ``401``, ``500`` and any other HTTP status from 400 to 599 likewise (without Retry-After).
- ``stall``: streams headers and the first (role) chunk, then sends nothing until the client goes away;
  a non-stream request never gets a response.
- ``stall-mid``: streams ``fault_after`` tokens, then sends nothing until the client goes away; a
  non-stream request gets its headers (200) when those tokens would be done, and never a body.
- ``cut``: the stream ends cleanly after ``fault_after`` tokens, with no finish_reason and no [DONE]; a
  non-stream request gets those tokens with ``finish_reason: null``.
- ``error-mid-stream``: after ``fault_after`` tokens the stream carries ``data: {"error": {...}}`` and
  ends; a non-stream request gets HTTP 500 instead.
- ``malformed-json``: after ``fault_after`` tokens the stream carries the line ``data: {not json`` and
  ends (no [DONE]), as a broken proxy would; a non-stream request gets a 200 with the body ``{not json``.
- ``malformed-shape``: after ``fault_after`` tokens, the chunk ``data: {"choices":"x"}`` (valid JSON, wrong
  shape), then ``data: [DONE]``; a non-stream request gets a 200 with the body ``{"choices":"x"}``.
- ``empty``: a 200 stream that sends only ``data: [DONE]`` (at ``ttft``), no chunk at all; a non-stream
  request gets a completion with ``"choices": []``.
- ``no-finish``: the whole answer arrives normally and the stream ends with ``data: [DONE]`` (after the
  usage chunk, if asked for), but no chunk carries a finish_reason; non-stream: ``finish_reason: null``.
- ``slow-headers``: the stream's headers wait for ``ttft`` too (they go out with the first token), to
  measure when a proxy sends its own headers; non-stream answers are unchanged (their headers always wait).
- ``none``: no fault (switches a server-wide fault off for one request).

Anthropic's Messages API: ``POST /v1/messages`` gives the same answers with the same timing and faults as
streamed events (message_start ... message_stop), Anthropic error objects, ``retry-after`` on 429 and 529
(a status fault "529" is Anthropic's overloaded error), and ``cache_control`` accounting: each request's
record has ``input_tokens``, ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` (see
`sot.testing.upstream_anthropic` and `sot.testing.upstream_cache`); /stats has ``prompt_cache`` counters. An
Anthropic client's base URL is the server's root (without ``/v1``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/messages``, ``GET /v1/models``, ``GET /health``, ``GET /stats``,
``POST /stats/reset``. /stats has counters (started, finished, cancelled, failed, active, max_active,
faulted) and ``requests``, a record of each of the last 500 requests (see `RequestRecord`): ``id``,
``index``, ``kind``, ``stream``, ``model``, ``fault`` (the fault applied, or null), ``http_status``,
``status`` (active, finished, cancelled, failed), ``outcome`` (active, completed, faulted, cancelled,
failed), ``completion_tokens`` (tokens sent), ``planned_tokens``, ``finish_reason``, ``max_tokens``,
``prompt_tokens``, ``last_user``, ``prompt_cache_key`` and ``user`` (body fields), ``headers`` (the request
headers X-SoT-Session and X-Request-ID and those named by ``--record-headers``, lower-case, when present),
and times: ``started_at``/``started_monotonic`` (arrival), ``first_token_at``/``first_token_monotonic``,
``ended_at``/``ended_monotonic``, in ``time.time()`` and ``time.monotonic()`` of this process (on Linux,
the latter compares with ``time.monotonic()`` of any process on the machine).
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sot.testing.upstream_answers import Msg, Plan, classify, jittered_length, plan_answer
from sot.testing.upstream_anthropic import Messages
from sot.testing.upstream_chat import ChatCompletions
from sot.testing.upstream_options import (
    DEFAULT_MODEL,
    FAULTS,
    KINDS,
    RECORDED_HEADERS,
    BadRequest,
    Kind,
    UpstreamOptions,
    format_seconds,
    normalize_fault,
    parse_overrides,
)
from sot.testing.upstream_stats import RequestRecord, UpstreamState

if TYPE_CHECKING:
    from sot.testing.replay import ReplayBook
from sot.testing.upstream_wire import error_body

__all__ = [
    "DEFAULT_MODEL",
    "FAULTS",
    "HOST",
    "KINDS",
    "READY_LINE_PREFIX",
    "RECORDED_HEADERS",
    "BadRequest",
    "Kind",
    "Msg",
    "Plan",
    "RequestRecord",
    "UpstreamOptions",
    "UpstreamState",
    "build_parser",
    "classify",
    "create_app",
    "error_body",
    "format_seconds",
    "jittered_length",
    "main",
    "normalize_fault",
    "options_from_args",
    "parse_overrides",
    "plan_answer",
]

HOST = "127.0.0.1"
READY_LINE_PREFIX = "sot test upstream listening on "


# ---------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------


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


class _UpstreamApp(Starlette):
    """Starlette, but chat completions and messages skip the middleware stack, which would wrap `send` for every
    chunk."""

    def __init__(self, state: UpstreamState) -> None:
        self._chat = ChatCompletions(state)
        self._messages = Messages(state)
        super().__init__(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/models", list_models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/stats", stats, methods=["GET"]),
                Route("/stats/reset", reset_stats, methods=["POST"]),
            ]
        )
        self.state.upstream = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
            scope["app"] = self
            await self._chat(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/messages":
            scope["app"] = self
            await self._messages(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(options: UpstreamOptions | None = None) -> Starlette:
    """The ASGI app; its state lives in `app.state.upstream` (an `UpstreamState`)."""
    return _UpstreamApp(UpstreamState(options or UpstreamOptions()))


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _fault_arg(value: str) -> str | None:
    try:
        return normalize_fault(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _fraction_arg(value: str) -> float:
    fraction = float(value)
    if not 0 <= fraction <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return fraction


def _seconds_arg(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds >= 0")
    return seconds


def _names_arg(value: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in value.split(",") if name.strip())


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
    p.add_argument(
        "--tokens-jitter",
        type=_fraction_arg,
        default=defaults.tokens_jitter,
        help="vary prose answer lengths by up to this fraction, deterministically per request (default 0)",
    )
    p.add_argument("--ttft", type=float, default=defaults.ttft, help="seconds to the first token")
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=defaults.tokens_per_second,
        help="token rate of each request (0: no delay)",
    )
    _add_fault_args(p, defaults)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the --fault-rate dice and --tokens-jitter")
    p.add_argument(
        "--record-headers",
        type=_names_arg,
        default=(),
        metavar="NAME,...",
        help="request headers to record in /stats, besides X-SoT-Session and X-Request-ID",
    )
    p.add_argument(
        "--replay",
        default=None,
        metavar="RESULTS",
        help="replay the answer lengths of a `sot eval run` results file, per question (sot.testing.replay)",
    )
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def _add_fault_args(p: argparse.ArgumentParser, defaults: UpstreamOptions) -> None:
    p.add_argument("--fault", type=_fault_arg, default=None, help=f"one of {', '.join(FAULTS)}, or an HTTP status")
    p.add_argument("--fault-rate", type=_fraction_arg, default=defaults.fault_rate, help="fraction of faulty requests")
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
        help="tokens sent before a cut, stall-mid, mid-stream error or malformed chunk",
    )
    p.add_argument(
        "--retry-after",
        type=_seconds_arg,
        default=defaults.retry_after,
        help="Retry-After of a 429, seconds (fractions allowed, e.g. 0.5)",
    )


def options_from_args(args: argparse.Namespace) -> UpstreamOptions:
    """The `UpstreamOptions` a parsed command line asks for."""
    return UpstreamOptions(
        model=args.model,
        skeleton_points=args.skeleton_points,
        tokens_per_answer=args.tokens_per_answer,
        full_answer_factor=args.full_answer_factor,
        tokens_jitter=args.tokens_jitter,
        ttft=args.ttft,
        tokens_per_second=args.tokens_per_second,
        fault=args.fault,
        fault_rate=args.fault_rate,
        fault_first=args.fault_first,
        fault_kind=args.fault_kind,
        fault_after=args.fault_after,
        retry_after=args.retry_after,
        seed=args.seed,
        record_headers=args.record_headers,
        replay=_replay_book(args.replay),
    )


def _replay_book(path: str | None) -> ReplayBook | None:
    from sot.testing.replay import ReplayBook

    return ReplayBook.load(path) if path else None


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
