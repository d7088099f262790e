"""`sot serve`: run the OpenAI-compatible SoT server and its side-by-side page (the app is in `sot.server`)."""

from __future__ import annotations

import importlib.util
import socket
from typing import Any

import click

from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors
from sot.errors import ConfigError
from sot.events import Mode

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
    help="Questions answered at once; beyond it requests get 429 with Retry-After.",
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
@click.option("--access-log/--no-access-log", default=False, help="Log every request.")
@click.option(
    "--ping-seconds",
    type=click.FloatRange(0.1),
    default=15.0,
    show_default=True,
    help="SSE keep-alive comment interval, so proxies do not drop a stream while the skeleton is written.",
)
@backend_options
@generation_options
@handle_errors
def serve(
    host: str,
    port: int,
    default_mode: Mode,
    router_name: str | None,
    server_api_key: str | None,
    max_concurrency: int,
    retry_after: int,
    max_body_bytes: int,
    max_messages: int,
    max_question_chars: int,
    max_tokens_limit: int,
    scripted_ttft: float,
    scripted_token_delay: float,
    log_level: str,
    access_log: bool,
    ping_seconds: float,
    **params: Any,
) -> None:
    """Serve SoT answers over an OpenAI-compatible API, and a page racing normal decoding against SoT.

    Point any OpenAI client at http://HOST:PORT/v1. Choose the mode per request with the model name
    ("sot:any", "normal:any", "auto:any"), the body field sot_mode, or the header X-SoT-Mode.
    """
    import uvicorn

    from sot.server import ServerSettings, create_app

    def progress(message: str) -> None:
        click.echo(message, err=True)

    if params["backend"] == "scripted":
        from sot.backends import create_backend

        # The test double, with its timing, so a real server process can be tested quickly.
        backend = create_backend("scripted", ttft=scripted_ttft, token_delay=scripted_token_delay)
    else:
        backend = build_backend(params, progress=progress)
    load = getattr(backend, "load", None)
    if callable(load):
        # Load the embedded model before listening, so /health means ready and no request pays for it.
        click.echo(f"loading {backend.name} model {backend.model}…", err=True)
        load()
    engine = build_engine(backend, params, router=_router(router_name, backend))
    settings = ServerSettings(
        api_key=server_api_key or None,
        default_mode=default_mode,
        max_concurrency=max_concurrency,
        retry_after=retry_after,
        max_body_bytes=max_body_bytes,
        max_messages=max_messages,
        max_question_chars=max_question_chars,
        max_tokens_limit=max_tokens_limit,
        ping_seconds=ping_seconds,
    )
    app = create_app(lambda: engine, settings)

    # Bind here rather than in uvicorn so that --port 0 works and the real address is announced.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1") and not server_api_key:
        click.echo(
            f"warning: listening on {host} without --server-api-key: anyone who can reach it can use it", err=True
        )
    click.echo(
        f"{READY_PREFIX}http://{shown_host}:{bound_port} "
        f"(backend {backend.name}, model {backend.model}, default mode {default_mode})"
    )
    loop, http = event_loop_and_http()
    config = uvicorn.Config(
        app,
        loop=loop,
        http=http,
        log_level=log_level,
        access_log=access_log,
        # Open streams are cancelled (and with them their upstream requests) shortly after a stop signal.
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    serve()
