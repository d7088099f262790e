"""`sot bench`: normal decoding against SoT on the same engine, measured side by side in one run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sot.bench.latency import (
    QuestionTiming,
    load_questions,
    measure_decode_rates,
    run_latency_bench,
    sot_decode_rate,
    summarize,
)
from sot.bench.latency_table import rows_table, summary_table
from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors

DEFAULT_DATASET = "vicuna80"
# API-like pacing of the bundled test upstream: roughly what a hosted GPT-4-class model streams.
API_LIKE = {"ttft": 0.35, "tokens_per_second": 40.0}


@click.command()
@click.option(
    "--dataset",
    default=DEFAULT_DATASET,
    show_default=True,
    help="A named dataset (vicuna80, lima: fetched once into the user's cache) or a JSONL file (question, id, "
    "category, sot_suitable).",
)
@click.option("--limit", type=click.IntRange(1), help="Only the first N questions.")
@click.option("--all-questions", is_flag=True, help="Include questions labelled unsuitable for SoT.")
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Measure every question K times, alternating which mode goes first; intervals cover the repeats. "
    "With --load: run the load check K times and judge each target on its median over the runs (95% CI).",
)
@click.option(
    "--replay",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A `sot eval run` results file: the test upstream replays its answers' lengths (normal answer, skeleton, "
    "each point) question by question, and its questions are the ones benchmarked.",
)
@click.option(
    "--upstream-ttft",
    type=click.FloatRange(0),
    default=API_LIKE["ttft"],
    show_default=True,
    help="Test upstream: seconds to each request's first token.",
)
@click.option(
    "--upstream-tokens-per-second",
    type=click.FloatRange(0, min_open=True),
    default=API_LIKE["tokens_per_second"],
    show_default=True,
    help="Test upstream: tokens per second of each request.",
)
@click.option(
    "--upstream/--no-upstream",
    default=None,
    help="Start the bundled test upstream (API-like rates) and bench against it. Default when no --base-url "
    "is given for an OpenAI-style backend.",
)
@click.option(
    "--load",
    "load_requests",
    type=click.IntRange(1),
    help="Instead: the `sot serve` load check, N concurrent streamed requests straight to the test upstream and "
    "as many through the server.",
)
@click.option(
    "--load-ttft",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="Load check: seconds to the first token.",
)
@click.option(
    "--load-tokens-per-second",
    type=click.FloatRange(0),
    default=40.0,
    show_default=True,
    help="Load check: tokens/s per stream.",
)
@click.option(
    "--load-answer-tokens",
    type=click.IntRange(1),
    default=300,
    show_default=True,
    help="Load check: tokens of a normal answer.",
)
@click.option(
    "--load-mode",
    type=click.Choice(["normal", "sot"]),
    default="normal",
    show_default=True,
    help="Load check: the server's mode for the requests (normal: like for like with the direct requests).",
)
@click.option(
    "--load-jitter",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Load check: vary answer lengths by up to this fraction (the upstream's tokens_jitter).",
)
@click.option(
    "--load-arrival-rate",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Load check: requests arrive as a Poisson process of this many per second (seeded, the same on both "
    "sides); 0: all at once, the burst the targets are set for.",
)
@click.option(
    "--load-workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Load check: `sot serve --workers N` (server CPU is summed over the workers).",
)
@click.option(
    "--output", type=click.Path(path_type=Path), help="Write every row and the summary (or the load report) as JSON."
)
@backend_options
@generation_options
@handle_errors
def bench(
    dataset: str,
    limit: int | None,
    all_questions: bool,
    repeat: int,
    replay: Path | None,
    upstream_ttft: float,
    upstream_tokens_per_second: float,
    upstream: bool | None,
    load_requests: int | None,
    load_ttft: float,
    load_tokens_per_second: float,
    load_answer_tokens: int,
    load_mode: str,
    load_jitter: float,
    load_arrival_rate: float,
    load_workers: int,
    output: Path | None,
    **params: Any,
) -> None:
    """Benchmark normal decoding against SoT (default: against the bundled test upstream)."""
    console = Console()
    if load_requests:
        _load_check(
            console,
            output,
            repeat,
            n_requests=load_requests,
            mode=load_mode,
            ttft=load_ttft,
            tokens_per_second=load_tokens_per_second,
            answer_tokens=load_answer_tokens,
            jitter=load_jitter,
            arrival_rate=load_arrival_rate,
            workers=load_workers,
        )
        return
    if replay is not None:
        from sot.testing.replay import ReplayBook

        questions = ReplayBook.load(replay).questions(only_suitable=not all_questions, limit=limit)
    else:
        questions = load_questions(dataset, only_suitable=not all_questions, limit=limit)
    explicit_backend = click.get_current_context().get_parameter_source("backend") != click.core.ParameterSource.DEFAULT
    if upstream is None:
        upstream = not explicit_backend or (params["backend"] in ("openai", "azure") and not params.get("base_url"))
    if replay is not None and not upstream:
        raise click.BadParameter("--replay runs against the bundled test upstream", param_hint="--replay")
    pacing = {"ttft": upstream_ttft, "tokens_per_second": upstream_tokens_per_second}
    if upstream:
        payload = _bench_upstream(console, questions, params, repeat, pacing, replay)
    else:
        payload = asyncio.run(_bench(console, questions, params, repeat))
    payload["settings"] = {
        "dataset": str(replay or dataset),
        "repeats": repeat,
        "upstream": {**pacing, "replay": str(replay) if replay else None} if upstream else None,
    }
    if output is not None:
        output.write_text(json.dumps(payload, indent=2))
        console.print(f"[dim]wrote {output}[/dim]")


def _bench_upstream(
    console: Console,
    questions: list[dict[str, Any]],
    params: dict[str, Any],
    repeats: int,
    pacing: dict[str, float],
    replay: Path | None,
) -> dict[str, Any]:
    """The benchmark against the bundled test upstream, started for it with this pacing (and replay file)."""
    from sot.testing.process import running_test_upstream

    with running_test_upstream(**pacing, replay=replay) as base_url:
        params = {**params, "backend": "openai", "base_url": base_url, "model": "sot-test", "api_key": "test"}
        console.print(
            f"[dim]test upstream at {base_url}: ttft {pacing['ttft']:g} s, {pacing['tokens_per_second']:g} "
            f"tokens/s per request{f', replaying {replay}' if replay else ''}[/dim]"
        )
        return asyncio.run(_bench(console, questions, params, repeats))


def _load_check(console: Console, output: Path | None, repeat: int, **settings: Any) -> None:
    """`sot bench --load N [--repeat K]`: print the report, or each run's line and the targets over the runs
    (and write it as JSON); exit 1 only when requests failed."""
    from sot.bench.load import render_load_report, run_load_check
    from sot.bench.load_repeat import RepeatedLoad, render_repeated, run_line
    from sot.bench.load_report import arrivals

    console.print(
        f"[dim]load check: {settings['n_requests']} streams {arrivals(settings)}, {settings['mode']} mode, "
        f"direct first, then through sot serve{f'; {repeat} runs, each with its own processes' if repeat > 1 else ''}"
        "[/dim]"
    )
    reports = []
    for index in range(1, repeat + 1):
        reports.append(asyncio.run(run_load_check(**settings)))
        if repeat > 1:
            console.print(run_line(index, reports[-1]))
    repeated = RepeatedLoad(reports)
    console.print(render_load_report(reports[-1]) if repeat == 1 else render_repeated(repeated))
    if output is not None:
        payload = reports[0].to_json() if repeat == 1 else repeated.to_json()
        output.write_text(json.dumps(payload, indent=2))
        console.print(f"[dim]wrote {output}[/dim]")
    if not repeated.ok:
        raise SystemExit(1)


async def _bench(
    console: Console, questions: list[dict[str, Any]], params: dict[str, Any], repeats: int = 1
) -> dict[str, Any]:
    backend = build_backend(params, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    engine = build_engine(backend, params)
    try:
        rates: dict[int, float] = {}
        if backend.name == "local":
            console.print("[dim]measuring the machine's decode rates (1 and 8 sequences)…[/dim]")
            rates = await measure_decode_rates(engine)
        console.print(
            f"[dim]{len(questions)} questions x {repeats}, normal and SoT alternating on "
            f"{backend.name}/{backend.model}[/dim]"
        )

        def progress(row: QuestionTiming) -> None:
            console.print(
                f"[dim]{row.id}{f' #{row.repeat + 1}' if repeats > 1 else ''}: normal {row.normal_seconds:.2f} s, "
                f"SoT {row.sot_seconds:.2f} s ({row.speedup:.2f}x)[/dim]"
            )

        rows = await run_latency_bench(engine, questions, repeats=repeats, on_row=progress)
    finally:
        await backend.aclose()
    summary = summarize(rows)
    console.print(rows_table(rows))
    console.print(summary_table(summary, _rate_lines(rates, rows)))
    return {"summary": summary.to_json(), "decode_rates": rates, "rows": [row.to_json() for row in rows]}


def _rate_lines(rates: dict[int, float], rows: list[QuestionTiming]) -> dict[str, str]:
    """The machine's reference decode rates, and SoT's overall rate against one sequence's."""
    if not rates:
        return {}
    extra = {"decode rate: 1 sequence / 8 sequences (tokens/s)": f"{rates[1]:.0f} / {rates[8]:.0f}"}
    sot_rate = sot_decode_rate(rows)
    if sot_rate:
        extra["SoT overall decode rate (tokens/s), vs 1 sequence"] = f"{sot_rate:.0f} ({sot_rate / rates[1]:.2f}x)"
    return extra
