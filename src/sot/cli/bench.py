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
    rows_table,
    run_latency_bench,
    sot_decode_rate,
    summarize,
    summary_table,
)
from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors

DEFAULT_DATASET = Path("../shared/data/vicuna80.jsonl")
# API-like pacing of the bundled test upstream: roughly what a hosted GPT-4-class model streams.
API_LIKE = {"ttft": 0.35, "tokens_per_second": 40.0}


@click.command()
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    default=DEFAULT_DATASET,
    show_default=True,
    help="JSONL questions (question, id, category, sot_suitable).",
)
@click.option("--limit", type=click.IntRange(1), help="Only the first N questions.")
@click.option("--all-questions", is_flag=True, help="Include questions labelled unsuitable for SoT.")
@click.option(
    "--upstream/--no-upstream",
    default=None,
    help="Start the bundled test upstream (API-like rates) and bench against it. Default when no --base-url "
    "is given for an OpenAI-style backend.",
)
@click.option("--load", "load_requests", type=click.IntRange(1), help="Run the server load check with N requests.")
@click.option("--output", type=click.Path(path_type=Path), help="Write every row and the summary as JSON.")
@backend_options
@generation_options
@handle_errors
def bench(
    dataset: Path,
    limit: int | None,
    all_questions: bool,
    upstream: bool | None,
    load_requests: int | None,
    output: Path | None,
    **params: Any,
) -> None:
    """Benchmark normal decoding against SoT (default: against the bundled test upstream)."""
    console = Console()
    if load_requests:
        from sot.bench.load import render_load_report, run_load_check

        report = asyncio.run(run_load_check(n_requests=load_requests))
        console.print(render_load_report(report))
        if not report.ok:
            raise SystemExit(1)
        return
    questions = load_questions(dataset, only_suitable=not all_questions, limit=limit)
    explicit_backend = click.get_current_context().get_parameter_source("backend") != click.core.ParameterSource.DEFAULT
    if upstream is None:
        upstream = not explicit_backend or (params["backend"] in ("openai", "azure") and not params.get("base_url"))
    if upstream:
        from sot.testing.process import running_test_upstream

        with running_test_upstream(**API_LIKE) as base_url:
            params = {**params, "backend": "openai", "base_url": base_url, "model": "sot-test", "api_key": "test"}
            console.print(
                f"[dim]test upstream at {base_url}: ttft {API_LIKE['ttft']} s, "
                f"{API_LIKE['tokens_per_second']:g} tokens/s per request[/dim]"
            )
            payload = asyncio.run(_bench(console, questions, params))
    else:
        payload = asyncio.run(_bench(console, questions, params))
    if output is not None:
        output.write_text(json.dumps(payload, indent=2))
        console.print(f"[dim]wrote {output}[/dim]")


async def _bench(console: Console, questions: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    backend = build_backend(params, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    engine = build_engine(backend, params)
    try:
        extra: dict[str, str] = {}
        rates: dict[int, float] = {}
        if backend.name == "local":
            console.print("[dim]measuring the machine's decode rates (1 and 8 sequences)…[/dim]")
            rates = await measure_decode_rates(engine)
        console.print(
            f"[dim]{len(questions)} questions, normal and SoT alternating on {backend.name}/{backend.model}[/dim]"
        )

        def progress(row: QuestionTiming) -> None:
            console.print(
                f"[dim]{row.id}: normal {row.normal_seconds:.2f} s, SoT {row.sot_seconds:.2f} s "
                f"({row.speedup:.2f}x)[/dim]"
            )

        rows = await run_latency_bench(engine, questions, on_row=progress)
    finally:
        await backend.aclose()
    summary = summarize(rows)
    if rates:
        sot_rate = sot_decode_rate(rows)
        extra["decode rate: 1 sequence / 8 sequences (tokens/s)"] = f"{rates[1]:.0f} / {rates[8]:.0f}"
        if sot_rate:
            extra["SoT overall decode rate (tokens/s), vs 1 sequence"] = f"{sot_rate:.0f} ({sot_rate / rates[1]:.2f}x)"
    console.print(rows_table(rows))
    console.print(summary_table(summary, extra))
    return {
        "summary": summary.to_json(),
        "decode_rates": rates,
        "rows": [
            {
                **row.__dict__,
                "speedup": row.speedup,
                "parallel_efficiency": row.parallel_efficiency,
                "equal_length_speedup": row.equal_length_speedup,
            }
            for row in rows
        ],
    }
