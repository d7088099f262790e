"""`sot serve`: run the OpenAI-compatible SoT server and its side-by-side page (the app is in `sot.server`)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from typing import TYPE_CHECKING, Any

import click

from sot.backends.base import Backend
from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors
from sot.engine import Engine
from sot.errors import ConfigError

if TYPE_CHECKING:
    from sot.server import ServerSettings

READY_PREFIX = "sot serve listening on "


def event_loop_and_http() -> tuple[str, str]:
    """uvicorn's fastest event loop and HTTP parser that are installed: uvloop and httptools (uvicorn[standard]),
    else asyncio's loop and h11, which cost more CPU per request and per streamed chunk."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return loop, http


def _router(name: str | None, backend: Any) -> Any:
    """The router for `auto` requests (the trained one unless named)."""
    from sot.router import make_router

    return make_router(name or "trained", backend=backend)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--mode",
    "default_mode",
    type=click.Choice(["sot", "normal", "auto"]),
    default="sot",
    show_default=True,
    help="Mode of requests that do not choose one (model prefix, sot_mode field or X-SoT-Mode header).",
)
@click.option("--router", "router_name", default=None, help="Router for auto mode (trained, heuristic, prompting).")
@click.option(
    "--server-api-key",
    envvar="SOT_SERVER_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1/* (env SOT_SERVER_API_KEY). /health and the page stay open.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Questions answered at once by each worker; beyond it requests get 429 with Retry-After.",
)
@click.option("--retry-after", type=click.IntRange(1, 3600), default=1, show_default=True, help="Seconds, on a 429.")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=1_000_000, show_default=True)
@click.option("--max-messages", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--max-question-chars",
    type=click.IntRange(1),
    default=32_000,
    show_default=True,
    help="Characters of all messages together.",
)
@click.option(
    "--max-tokens-limit",
    type=click.IntRange(1),
    default=4096,
    show_default=True,
    help="Largest max_tokens a request may ask for.",
)
@click.option("--scripted-ttft", type=click.FloatRange(0.0), default=0.0, hidden=True)
@click.option("--scripted-token-delay", type=click.FloatRange(0.0), default=0.0, hidden=True)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="warning",
    show_default=True,
)
@click.option("--access-log/--no-access-log", default=False, help="Log every request (uvicorn's plain text log).")
@click.option(
    "--access-log-json",
    "access_log_json",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[PATH]",
    help="One JSON line per request (id, modes, points, fallback, upstream requests, tokens, times, status): "
    "to stderr, or appended to PATH.",
)
@click.option(
    "--ping-seconds",
    type=click.FloatRange(0.1),
    default=15.0,
    show_default=True,
    help="SSE keep-alive comment interval, so proxies do not drop a stream while the skeleton is written.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes on the one address, each with its own socket (SO_REUSEPORT), event loop, upstream "
    "connections and --max-concurrency. With -b local each worker loads its own copy of the model.",
)
@click.option(
    "--routing-header",
    default="X-SoT-Session",
    show_default=True,
    help="Header carrying one routing key on every upstream request of a question, for a sticky load balancer "
    "(nginx 'hash $http_x_sot_session consistent'); clients may send it to keep a conversation on one "
    "replica. 'none' sends no header.",
)
@click.option(
    "--drain-seconds",
    type=click.FloatRange(0.0),
    default=30.0,
    show_default=True,
    help="On SIGTERM: how long answers in flight may finish (new questions get 503) before they are cancelled.",
)
@click.option(
    "--metrics/--no-metrics",
    default=False,
    help="Prometheus metrics at /metrics (behind --server-api-key when set).",
)
@backend_options
@generation_options
@handle_errors
def serve(**options: Any) -> None:
    """Serve SoT answers over an OpenAI-compatible API, and a page racing normal decoding against SoT.

    Point any OpenAI client at http://HOST:PORT/v1. Choose the mode per request with the model name
    ("sot:any", "normal:any", "auto:any"), the body field sot_mode, or the header X-SoT-Mode.
    """
    from sot.server.workers import WorkerSpec, run_workers, serve_app

    params = dict(options)
    host, port, workers = params.pop("host"), params.pop("port"), params.pop("workers")
    routing_header = params["routing_header"]
    params["routing_header"] = None if routing_header.strip().lower() in ("", "none") else routing_header.strip()
    settings = server_settings(params)
    backend = make_backend(params)
    if params["backend"] == "local" and workers > 1:
        click.echo(
            f"warning: --workers {workers} with the embedded model: every worker loads its own copy of the model "
            f"({workers}x its memory, the CPU shared among {workers} decoders); one worker batches its questions",
            err=True,
        )
    sockets = bind(host, port, workers)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        click.echo(
            f"warning: listening on {host} without --server-api-key: anyone who can reach it can use it", err=True
        )
    shown_host, shown_port = f"[{host}]" if ":" in host else host, sockets[0].getsockname()[1]
    click.echo(
        f"{READY_PREFIX}http://{shown_host}:{shown_port} (backend {backend.name}, model {backend.model}, "
        f"default mode {settings.default_mode}, {workers} worker{'s' if workers > 1 else ''})"
    )
    loop, http = event_loop_and_http()
    spec = WorkerSpec(
        build=worker_engine,
        params=params,
        settings=settings,
        # Answers still open after the drain have been cancelled; their streams end within moments.
        uvicorn={
            "loop": loop,
            "http": http,
            "log_level": params["log_level"],
            "access_log": params["access_log"],
            "timeout_graceful_shutdown": 3,
        },
    )
    if workers == 1:
        serve_app(spec, sockets[0], engine=engine_for(backend, params))
        return
    sys.exit(run_workers(spec, sockets, workers))


def server_settings(params: dict[str, Any]) -> ServerSettings:
    """The app's `ServerSettings` from the command's options."""
    from sot.server import ServerSettings

    return ServerSettings(
        api_key=params["server_api_key"] or None,
        default_mode=params["default_mode"],
        max_concurrency=params["max_concurrency"],
        retry_after=params["retry_after"],
        max_body_bytes=params["max_body_bytes"],
        max_messages=params["max_messages"],
        max_question_chars=params["max_question_chars"],
        max_tokens_limit=params["max_tokens_limit"],
        ping_seconds=params["ping_seconds"],
        metrics=params["metrics"],
        routing_header=params["routing_header"],
        drain_seconds=params["drain_seconds"],
        access_log_json=params["access_log_json"],
    )


def make_backend(params: dict[str, Any]) -> Backend:
    """The backend the options name, its upstream requests carrying the routing header."""
    if params["backend"] == "scripted":
        from sot.backends import create_backend

        # The test double, with its timing, so a real server process can be tested quickly.
        backend = create_backend("scripted", ttft=params["scripted_ttft"], token_delay=params["scripted_token_delay"])
    else:
        backend = build_backend(params, progress=lambda message: click.echo(message, err=True))
    if hasattr(backend, "routing_header"):
        backend.routing_header = params["routing_header"]
    return backend


def engine_for(backend: Backend, params: dict[str, Any]) -> Engine:
    """The engine over `backend`; the embedded model is loaded first, so /health means ready."""
    load = getattr(backend, "load", None)
    if callable(load):
        click.echo(f"loading {backend.name} model {backend.model}…", err=True)
        load()
    return build_engine(backend, params, router=_router(params["router_name"], backend))


def worker_engine(params: dict[str, Any]) -> Engine:
    """A worker's own engine: its backend (connection pool, or model) built in the worker's process."""
    return engine_for(make_backend(params), params)


# Linux spreads new connections among the sockets of one port that set SO_REUSEPORT; elsewhere (macOS, the
# BSDs) one of them gets them all, so several workers share one socket there.
REUSEPORT_SPREADS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """The listening sockets, bound here rather than in uvicorn so that --port 0 works and the real address is
    announced before any worker starts. One socket for one worker; for several, one socket per worker on the
    same address with SO_REUSEPORT (the kernel spreads new connections evenly among them: on one shared socket
    the worker that wakes first takes most of a burst), or one shared socket where the system does not spread
    them (`REUSEPORT_SPREADS`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    spread = count > 1 and REUSEPORT_SPREADS
    sockets: list[socket.socket] = []
    try:
        if spread and port:
            # Sockets with SO_REUSEPORT share a port with any other such socket of this user: a plain bind first
            # fails if the port is taken, so a second server started on it is refused, not handed connections.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        for _ in range(count if spread else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spread:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # The first socket may ask for port 0; the others take the port it was given.
            sock.bind((host, sockets[0].getsockname()[1] if len(sockets) > 1 else port))
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sockets


if __name__ == "__main__":
    serve()
