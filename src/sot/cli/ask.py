"""`sot ask`: answer one question, with a live view of the skeleton and its points filling in parallel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.live import Live

from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors
from sot.cli.view import AnswerView, summary_line
from sot.errors import InputError
from sot.events import Done, Event, Mode, Result


def _read_question(question: str | None) -> str:
    if question is None or question == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError('no question: pass it as an argument (sot ask "...") or on standard input')
        question = sys.stdin.read()
    if not question.strip():
        raise InputError("the question is empty")
    return question.strip()


@click.command()
@click.argument("question", required=False)
@click.option(
    "--mode",
    type=click.Choice(["sot", "normal", "auto"]),
    default="sot",
    show_default=True,
    help="sot: skeleton then parallel points; normal: plain decoding; auto: a router decides.",
)
@click.option("--router", "router_name", default=None, help="Router for --mode auto (trained, heuristic, prompting).")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Print every event as a JSON line as it happens.")
@backend_options
@generation_options
@handle_errors
def ask(
    question: str | None, mode: Mode, router_name: str | None, as_json: bool, as_jsonl: bool, **params: Any
) -> None:
    """Answer QUESTION (or standard input) with Skeleton-of-Thought."""
    text = _read_question(question)
    err = Console(stderr=True)
    backend = build_backend(params, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    router = None
    if mode == "auto":
        from sot.router import make_router

        router = make_router(router_name or "trained", backend=backend)
    engine = build_engine(backend, params, router=router)
    result = asyncio.run(_run(engine, text, mode, as_json=as_json, as_jsonl=as_jsonl))
    if result is not None and not result.complete:
        sys.exit(3)  # a truncated answer is not passed off as whole, even to scripts


async def _run(engine: Any, question: str, mode: Mode, *, as_json: bool, as_jsonl: bool) -> Result | None:
    out = Console()
    err = Console(stderr=True)
    result: Result | None = None
    try:
        events = engine.stream(question, mode)
        async with contextlib.aclosing(events):
            if as_jsonl or as_json:
                async for event in events:
                    if isinstance(event, Done):
                        result = event.result
                    if as_jsonl:
                        click.echo(event.model_dump_json())
                if as_json and result is not None:
                    click.echo(json.dumps(result.model_dump(mode="json"), indent=2))
            elif out.is_terminal:
                result = await _live(events, out)
            else:
                async for event in events:
                    if isinstance(event, Done):
                        result = event.result
                if result is not None:
                    click.echo(result.answer)
        if result is not None and not (as_json or as_jsonl):
            err.print(f"[dim]{summary_line(result)}[/dim]", highlight=False)
    finally:
        await engine.backend.aclose()
    return result


async def _live(events: Any, console: Console) -> Result | None:
    view = AnswerView()
    result: Result | None = None
    with Live(view.render(), console=console, refresh_per_second=12, transient=True) as live:
        async for event in events:
            event_: Event = event
            if isinstance(event_, Done):
                result = event_.result
            view.apply(event_)
            live.update(view.render())
    if result is not None:
        console.print(result.answer, highlight=False)
    return result
