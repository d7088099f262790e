"""Latency benchmark: normal decoding and SoT on the same engine, alternating per question, side by side.

It measures, per question: both wall times, the speed-up, SoT's parallel efficiency
((skeleton time + slowest point time) / SoT time: 1.0 means the points really ran at the same time),
both answers' lengths and whether either hit its token cap, and the equal-length speed-up: SoT's time
against the time normal decoding took to produce as many tokens as SoT's answer has (from the normal
run's per-token timestamps). That last ratio separates what parallel decoding buys from what a shorter
answer buys, which a plain speed-up silently mixes. This module computes and renders; it starts nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from sot.engine import Engine
from sot.eval.dataset import load_dataset
from sot.events import Result


@dataclass
class QuestionTiming:
    """Both modes' measurements for one question."""

    id: str
    category: str
    normal_seconds: float
    sot_seconds: float
    normal_tokens: int
    sot_tokens: int
    normal_capped: bool
    sot_capped: bool
    sot_fallback: str | None
    skeleton_seconds: float | None
    slowest_point_seconds: float | None
    points: int
    normal_seconds_at_sot_length: float | None
    prompt_tokens: int = 0  # what prefilling every SoT request from scratch would compute
    computed_prompt_tokens: int | None = None  # what the backend actually computed (prefix reuse)
    backend_counters: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.normal_seconds / self.sot_seconds

    @property
    def parallel_efficiency(self) -> float | None:
        if self.skeleton_seconds is None or self.slowest_point_seconds is None or self.sot_fallback:
            return None
        return (self.skeleton_seconds + self.slowest_point_seconds) / self.sot_seconds

    @property
    def equal_length_speedup(self) -> float | None:
        if self.normal_seconds_at_sot_length is None:
            return None
        return self.normal_seconds_at_sot_length / self.sot_seconds

    @property
    def both_finished(self) -> bool:
        return not (self.normal_capped or self.sot_capped)


def load_questions(path: Path, *, only_suitable: bool = True, limit: int | None = None) -> list[dict[str, Any]]:
    """Questions from a JSONL dataset (the evaluation harness's format), optionally only SoT-suitable ones."""
    rows = [
        {"id": q.id, "category": q.category, "question": q.question}
        for q in load_dataset(path)
        if not (only_suitable and q.sot_suitable is False)
    ]
    return rows[:limit] if limit else rows


def time_at_token(result: Result, tokens: int) -> float | None:
    """When normal decoding had produced `tokens` tokens (linear beyond its end: it stopped sooner)."""
    times = result.stats.token_times
    total = result.stats.completion_tokens or len(times)
    if not times or total <= 0 or tokens <= 0:
        return None
    if tokens >= total:
        return result.stats.total_seconds * tokens / total
    # token_times has one entry per streamed chunk; map the token count onto chunks proportionally.
    position = max(0, min(len(times) - 1, math.ceil(tokens * len(times) / total) - 1))
    return times[position]


def measure_question(normal: Result, sot: Result, row: dict[str, Any]) -> QuestionTiming:
    """Fold one question's two results into its timing row."""
    stats = sot.stats
    used_sot = sot.mode_used == "sot"
    return QuestionTiming(
        id=str(row["id"]),
        category=str(row.get("category", "all")),
        normal_seconds=normal.stats.total_seconds,
        sot_seconds=stats.total_seconds,
        normal_tokens=normal.stats.completion_tokens,
        sot_tokens=stats.completion_tokens,
        normal_capped=normal.finish_reason == "length",
        sot_capped=sot.finish_reason == "length",
        sot_fallback=sot.fallback_reason,
        skeleton_seconds=stats.skeleton_seconds if used_sot else None,
        slowest_point_seconds=stats.slowest_point_seconds if used_sot else None,
        points=len(sot.points),
        normal_seconds_at_sot_length=time_at_token(normal, stats.completion_tokens),
        prompt_tokens=stats.prompt_tokens,
        computed_prompt_tokens=stats.computed_prompt_tokens,
        backend_counters=stats.backend,
    )


async def run_latency_bench(
    engine: Engine,
    questions: Sequence[dict[str, Any]],
    *,
    on_row: Callable[[QuestionTiming], None] | None = None,
) -> list[QuestionTiming]:
    """Answer each question in both modes, one after the other, alternating which goes first."""
    rows: list[QuestionTiming] = []
    for number, row in enumerate(questions):
        # Alternate the order so neither mode always runs on a warmer cache or a cooler CPU.
        if number % 2 == 0:
            normal = await engine.run(row["question"], "normal")
            sot = await engine.run(row["question"], "sot")
        else:
            sot = await engine.run(row["question"], "sot")
            normal = await engine.run(row["question"], "normal")
        timing = measure_question(normal, sot, row)
        rows.append(timing)
        if on_row is not None:
            on_row(timing)
    return rows


def geometric_mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Summary:
    """Totals over all questions of a benchmark run."""

    questions: int
    speedup_geomean: float | None
    speedup_median: float | None
    finished_questions: int
    finished_speedup_geomean: float | None
    finished_speedup_median: float | None
    equal_length_speedup_geomean: float | None
    equal_length_speedup_median: float | None
    parallel_efficiency_median: float | None
    normal_capped: int
    sot_capped: int
    sot_fallbacks: int
    mean_normal_tokens: float
    mean_sot_tokens: float
    prompt_tokens: int
    computed_prompt_tokens: int | None
    sot_decode_steps_mean: float | None = None  # per SoT answer, where the backend counts steps
    sot_sequences_per_step: float | None = None  # mean batch size of those steps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rows: Sequence[QuestionTiming]) -> Summary:
    """Speed-ups (geometric mean and median), over all questions and over those both modes finished."""
    finished = [r for r in rows if r.both_finished]
    equal = [r.equal_length_speedup for r in rows if r.equal_length_speedup is not None]
    efficiency = [r.parallel_efficiency for r in rows if r.parallel_efficiency is not None]
    computed = [r.computed_prompt_tokens for r in rows if r.computed_prompt_tokens is not None]
    steps, sequences = 0.0, 0.0
    for r in rows:
        for key, count in r.backend_counters.items():
            if key.startswith("batch_size."):
                steps += count
                sequences += int(key.split(".", 1)[1]) * count
    return Summary(
        questions=len(rows),
        speedup_geomean=geometric_mean([r.speedup for r in rows]),
        speedup_median=median([r.speedup for r in rows]),
        finished_questions=len(finished),
        finished_speedup_geomean=geometric_mean([r.speedup for r in finished]),
        finished_speedup_median=median([r.speedup for r in finished]),
        equal_length_speedup_geomean=geometric_mean(equal),
        equal_length_speedup_median=median(equal),
        parallel_efficiency_median=median(efficiency),
        normal_capped=sum(r.normal_capped for r in rows),
        sot_capped=sum(r.sot_capped for r in rows),
        sot_fallbacks=sum(1 for r in rows if r.sot_fallback),
        mean_normal_tokens=statistics.fmean([r.normal_tokens for r in rows]) if rows else 0.0,
        mean_sot_tokens=statistics.fmean([r.sot_tokens for r in rows]) if rows else 0.0,
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        computed_prompt_tokens=sum(computed) if len(computed) == len(rows) and rows else None,
        sot_decode_steps_mean=steps / len(rows) if steps and rows else None,
        sot_sequences_per_step=sequences / steps if steps else None,
    )


def _fmt(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}{suffix}"


def rows_table(rows: Sequence[QuestionTiming]) -> Table:
    """Per-question table."""
    table = Table(title="normal vs SoT, per question", header_style="bold")
    for column in ("id", "category", "normal s", "SoT s", "speed-up", "par. eff.", "eq.-len", "tokens n/SoT", "pts"):
        table.add_column(column, justify="right" if column not in ("id", "category") else "left")
    for r in rows:
        tokens = f"{r.normal_tokens}{'*' if r.normal_capped else ''}/{r.sot_tokens}{'*' if r.sot_capped else ''}"
        table.add_row(
            r.id,
            r.category,
            _fmt(r.normal_seconds),
            _fmt(r.sot_seconds),
            _fmt(r.speedup, "x"),
            _fmt(r.parallel_efficiency),
            _fmt(r.equal_length_speedup, "x"),
            tokens,
            str(r.points) if not r.sot_fallback else "fb",
        )
    table.caption = "* hit the token cap · fb: SoT fell back to normal decoding · eq.-len: equal-length speed-up"
    return table


def summary_table(summary: Summary, extra: dict[str, str] | None = None) -> Table:
    """Totals table."""
    table = Table(title="overall", show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    lines = [
        ("questions", str(summary.questions)),
        ("speed-up, geometric mean (all)", _fmt(summary.speedup_geomean, "x")),
        ("speed-up, median (all)", _fmt(summary.speedup_median, "x")),
        (
            f"speed-up, geometric mean (both ended on their own: {summary.finished_questions})",
            _fmt(summary.finished_speedup_geomean, "x"),
        ),
        ("speed-up, median (both ended on their own)", _fmt(summary.finished_speedup_median, "x")),
        ("equal-length speed-up, geometric mean", _fmt(summary.equal_length_speedup_geomean, "x")),
        ("equal-length speed-up, median", _fmt(summary.equal_length_speedup_median, "x")),
        ("parallel efficiency, median", _fmt(summary.parallel_efficiency_median)),
        ("answers at the token cap (normal / SoT)", f"{summary.normal_capped} / {summary.sot_capped}"),
        ("SoT fallbacks to normal", str(summary.sot_fallbacks)),
        ("mean answer tokens (normal / SoT)", f"{summary.mean_normal_tokens:.0f} / {summary.mean_sot_tokens:.0f}"),
    ]
    if summary.computed_prompt_tokens is not None and summary.prompt_tokens:
        saved = 1 - summary.computed_prompt_tokens / summary.prompt_tokens
        lines.append(
            (
                "SoT prompt tokens computed / without reuse",
                f"{summary.computed_prompt_tokens} / {summary.prompt_tokens} ({saved:.0%} saved)",
            )
        )
    if summary.sot_decode_steps_mean is not None and summary.sot_sequences_per_step is not None:
        lines.append(
            (
                "SoT decode steps per answer, sequences per step",
                f"{summary.sot_decode_steps_mean:.0f}, {summary.sot_sequences_per_step:.2f}",
            )
        )
    lines.extend((extra or {}).items())
    for key, value in lines:
        table.add_row(key, value)
    return table


async def measure_decode_rates(
    engine: Engine, *, sequences: Sequence[int] = (1, 8), max_tokens: int = 128
) -> dict[int, float]:
    """Summed decode rate (tokens/s) with 1 and with 8 concurrent sequences: the machine's reference.

    Each sequence gets a distinct prompt asking for a long answer, so decoding runs to (nearly) the budget.
    """
    import asyncio
    import dataclasses
    import time

    from sot.backends.base import GenerationRequest, Message

    sampling = dataclasses.replace(engine.config.sampling, max_tokens=max_tokens)

    async def one(i: int) -> int:
        request = GenerationRequest(
            messages=(Message("user", f"Write a long story about a traveller named number {i}."),),
            sampling=sampling,
        )
        tokens = 0
        async for chunk in engine.backend.stream(request):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            elif chunk.text:
                tokens += 1
        return tokens

    rates: dict[int, float] = {}
    await one(0)  # warm-up: load weights, fill caches
    for n in sequences:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(i + 1) for i in range(n)))
        rates[n] = sum(counts) / (time.perf_counter() - started)
    return rates


def sot_decode_rate(rows: Sequence[QuestionTiming]) -> float | None:
    """Tokens per second that SoT's runs decoded overall (skeleton and points)."""
    seconds = sum(r.sot_seconds for r in rows if not r.sot_fallback)
    tokens = sum(r.sot_tokens for r in rows if not r.sot_fallback)
    return tokens / seconds if seconds else None
