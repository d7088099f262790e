"""Latency benchmark: normal decoding and SoT on the same engine, alternating which goes first, side by side.

It measures, per question and repeat: both wall times, the speed-up, SoT's parallel efficiency
((skeleton time + slowest point time) / SoT time: 1.0 means the points really ran at the same time),
both answers' lengths and whether either hit its token cap, and the equal-length speed-up (SoT's time
against normal decoding's time to as many tokens as SoT's answer has; `sot.eval.equal_length`, the same
definition `sot eval report` uses). That last ratio separates what parallel decoding buys from what a
shorter answer buys, which a plain speed-up silently mixes. Questions whose normal answer is shorter than
SoT's have no equal-length figure and are counted. Every summary figure comes with a 95% bootstrap
interval over questions and repeats (`sot.eval.spread`). This module computes; it starts and draws nothing
(`sot.bench.latency_table` renders).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sot.backends.base import GenerationRequest, Message
from sot.engine import Engine
from sot.eval.equal_length import Timeline, equal_length_speedup, time_at_length
from sot.eval.metrics import geometric_mean as _geometric_mean
from sot.eval.spread import Interval, bootstrap_settings, intervals
from sot.events import Result


@dataclass
class QuestionTiming:
    """Both modes' measurements for one question in one repeat."""

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
    normal_timeline: Timeline | None = None  # when normal decoding's tokens arrived
    prompt_tokens: int = 0  # what prefilling every SoT request from scratch would compute
    computed_prompt_tokens: int | None = None  # what the backend actually computed (prefix reuse)
    backend_counters: dict[str, Any] = field(default_factory=dict)
    repeat: int = 0
    normal_first: bool = True

    @property
    def speedup(self) -> float:
        return self.normal_seconds / self.sot_seconds

    @property
    def parallel_efficiency(self) -> float | None:
        if self.skeleton_seconds is None or self.slowest_point_seconds is None or self.sot_fallback:
            return None
        return (self.skeleton_seconds + self.slowest_point_seconds) / self.sot_seconds

    @property
    def normal_seconds_at_sot_length(self) -> float | None:
        """When normal decoding had written as many tokens as SoT's answer has; None if it never did."""
        return None if self.normal_timeline is None else time_at_length(self.normal_timeline, self.sot_tokens)

    @property
    def equal_length_speedup(self) -> float | None:
        """`sot.eval.equal_length.equal_length_speedup`: None when the normal answer is shorter than SoT's."""
        if self.normal_timeline is None or self.sot_seconds <= 0:
            return None
        return equal_length_speedup(self.normal_timeline, self.sot_tokens, self.sot_seconds)

    @property
    def both_finished(self) -> bool:
        return not (self.normal_capped or self.sot_capped)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "speedup": self.speedup,
            "parallel_efficiency": self.parallel_efficiency,
            "equal_length_speedup": self.equal_length_speedup,
            "normal_seconds_at_sot_length": self.normal_seconds_at_sot_length,
        }


def load_questions(
    dataset: str, *, only_suitable: bool = True, limit: int | None = None, fetch: bool = True
) -> list[dict[str, Any]]:
    """Questions of a named dataset or a JSONL file (`sot.eval.datasets`), optionally only SoT-suitable ones."""
    from sot.eval.datasets import open_dataset

    rows = [
        {"id": q.id, "category": q.category, "question": q.question}
        for q in open_dataset(dataset, fetch=fetch)
        if not (only_suitable and q.sot_suitable is False)
    ]
    return rows[:limit] if limit else rows


def measure_question(
    normal: Result, sot: Result, row: dict[str, Any], *, repeat: int = 0, normal_first: bool = True
) -> QuestionTiming:
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
        normal_timeline=Timeline.from_stats(normal.stats),
        prompt_tokens=stats.prompt_tokens,
        computed_prompt_tokens=stats.computed_prompt_tokens,
        backend_counters=stats.backend,
        repeat=repeat,
        normal_first=normal_first,
    )


async def run_latency_bench(
    engine: Engine,
    questions: Sequence[dict[str, Any]],
    *,
    repeats: int = 1,
    on_row: Callable[[QuestionTiming], None] | None = None,
) -> list[QuestionTiming]:
    """Answer each question in both modes, `repeats` times over, alternating which mode goes first.

    Repeat `r` of question `i` runs normal decoding first when `i + r` is even: neighbours differ, and with
    two repeats every question runs once in each order, so neither mode always gets the warmer cache.
    """
    rows: list[QuestionTiming] = []
    for repeat in range(repeats):
        for number, row in enumerate(questions):
            normal_first = (number + repeat) % 2 == 0
            if normal_first:
                normal = await engine.run(row["question"], "normal")
                sot = await engine.run(row["question"], "sot")
            else:
                sot = await engine.run(row["question"], "sot")
                normal = await engine.run(row["question"], "normal")
            timing = measure_question(normal, sot, row, repeat=repeat, normal_first=normal_first)
            rows.append(timing)
            if on_row is not None:
                on_row(timing)
    return rows


def geometric_mean(values: Sequence[float]) -> float | None:
    """The geometric mean of the positive values; None without any."""
    return _geometric_mean(v for v in values if v > 0)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# The summary figures that get a bootstrap interval: name -> (series, statistic).
INTERVAL_FIGURES: dict[str, tuple[str, str]] = {
    "speedup_geomean": ("speedup", "geomean"),
    "speedup_median": ("speedup", "median"),
    "finished_speedup_geomean": ("finished_speedup", "geomean"),
    "finished_speedup_median": ("finished_speedup", "median"),
    "equal_length_speedup_geomean": ("equal_length_speedup", "geomean"),
    "equal_length_speedup_median": ("equal_length_speedup", "median"),
    "parallel_efficiency_median": ("parallel_efficiency", "median"),
}


@dataclass
class Summary:
    """Totals over all questions (and repeats) of a benchmark run; `intervals` holds each figure's 95% CI."""

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
    repeats: int = 1
    runs: int = 0  # question x repeat pairs measured
    finished_runs: int = 0
    equal_length_compared: int = 0  # runs with an equal-length figure
    equal_length_too_short: int = 0  # runs whose normal answer was shorter than SoT's: not compared
    intervals: dict[str, Interval | None] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=bootstrap_settings)

    def interval(self, figure: str) -> Interval | None:
        return self.intervals.get(figure)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["intervals"] = {k: None if v is None else v.as_dict() for k, v in self.intervals.items()}
        return data


def _batch_counters(rows: Sequence[QuestionTiming]) -> tuple[float, float]:
    """(decode steps, sequences over those steps) the backend counted for SoT's answers."""
    steps, sequences = 0.0, 0.0
    for r in rows:
        for key, count in r.backend_counters.items():
            if key.startswith("batch_size."):
                steps += count
                sequences += int(key.split(".", 1)[1]) * count
    return steps, sequences


def _series(rows: Sequence[QuestionTiming]) -> dict[str, list[tuple[str, float]]]:
    """(question id, value) rows of every ratio that gets an interval."""
    return {
        "speedup": [(r.id, r.speedup) for r in rows],
        "finished_speedup": [(r.id, r.speedup) for r in rows if r.both_finished],
        "equal_length_speedup": [(r.id, e) for r in rows if (e := r.equal_length_speedup) is not None],
        "parallel_efficiency": [(r.id, p) for r in rows if (p := r.parallel_efficiency) is not None],
    }


def summarize(rows: Sequence[QuestionTiming], *, seed: int = 0) -> Summary:
    """Speed-ups (geometric mean and median, with intervals), over all runs and over those both modes finished."""
    series = _series(rows)
    values = {name: [v for _, v in pairs] for name, pairs in series.items()}
    spread = intervals(series, seed=seed)
    computed = [r.computed_prompt_tokens for r in rows if r.computed_prompt_tokens is not None]
    steps, sequences = _batch_counters(rows)
    return Summary(
        questions=len({r.id for r in rows}),
        speedup_geomean=geometric_mean(values["speedup"]),
        speedup_median=median(values["speedup"]),
        finished_questions=len({r.id for r in rows if r.both_finished}),
        finished_speedup_geomean=geometric_mean(values["finished_speedup"]),
        finished_speedup_median=median(values["finished_speedup"]),
        equal_length_speedup_geomean=geometric_mean(values["equal_length_speedup"]),
        equal_length_speedup_median=median(values["equal_length_speedup"]),
        parallel_efficiency_median=median(values["parallel_efficiency"]),
        normal_capped=sum(r.normal_capped for r in rows),
        sot_capped=sum(r.sot_capped for r in rows),
        sot_fallbacks=sum(1 for r in rows if r.sot_fallback),
        mean_normal_tokens=statistics.fmean([r.normal_tokens for r in rows]) if rows else 0.0,
        mean_sot_tokens=statistics.fmean([r.sot_tokens for r in rows]) if rows else 0.0,
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        computed_prompt_tokens=sum(computed) if len(computed) == len(rows) and rows else None,
        sot_decode_steps_mean=steps / len(rows) if steps and rows else None,
        sot_sequences_per_step=sequences / steps if steps else None,
        repeats=max((r.repeat for r in rows), default=0) + 1,
        runs=len(rows),
        finished_runs=len(series["finished_speedup"]),
        equal_length_compared=len(series["equal_length_speedup"]),
        equal_length_too_short=len(rows) - len(series["equal_length_speedup"]),
        intervals={name: spread[s][stat] for name, (s, stat) in INTERVAL_FIGURES.items()},
        bootstrap=bootstrap_settings(seed=seed),
    )


async def measure_decode_rates(
    engine: Engine, *, sequences: Sequence[int] = (1, 8), max_tokens: int = 128
) -> dict[int, float]:
    """Summed decode rate (tokens/s) with 1 and with 8 concurrent sequences: the machine's reference.

    Each sequence gets a distinct prompt asking for a long answer, so decoding runs to (nearly) the budget.
    """
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
