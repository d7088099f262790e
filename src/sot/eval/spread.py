"""How sure a figure is: seeded bootstrap confidence intervals over questions, and over repeats within one.

A benchmark measures each question once or several times (repeats). The interval of a statistic (geometric
mean, median) comes from a two-stage bootstrap: draw the questions with replacement, then, within each
drawn question, draw its repeats with replacement, and compute the statistic on the drawn values; the
interval is the middle `level` share of those resampled statistics (percentile method). Questions are the
unit because they differ far more than repeats of one question do; the second stage keeps run-to-run noise
in the interval. The generator is seeded, so the same measurements give the same interval.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sot.eval.metrics import percentile

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0

Statistic = Callable[[Sequence[float]], float]


def log_mean(values: Sequence[float]) -> float:
    """The geometric mean of positive values.

    >>> round(log_mean([2.0, 0.5]), 9)
    1.0
    """
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


STATISTICS: dict[str, Statistic] = {"geomean": log_mean, "median": statistics.median}


@dataclass(frozen=True, slots=True)
class Interval:
    """A statistic of the measured values, and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def clears(self, target: float) -> bool:
        """Whether the whole interval is at or above `target` (a target counts as met only then)."""
        return self.low >= target

    def text(self, suffix: str = "x") -> str:
        """ "2.13x (95% CI 1.95-2.31x)".

        >>> Interval(2.134, 1.951, 2.309).text()
        '2.13x (95% CI 1.95-2.31x)'
        """
        return f"{self.estimate:.2f}{suffix} ({self.level:.0%} CI {self.low:.2f}-{self.high:.2f}{suffix})"


def bootstrap_interval(
    groups: Sequence[Sequence[float]],
    statistic: Statistic,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval | None:
    """The statistic of all values in `groups` (one group per question: its repeats) with its interval.

    None when there are no values. Empty groups are ignored.

    >>> interval = bootstrap_interval([[1.0], [2.0], [3.0]], statistics.median, resamples=200)
    >>> interval.estimate, 1.0 <= interval.low <= interval.high <= 3.0
    (2.0, True)
    """
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    kept = [list(g) for g in groups if g]
    if not kept:
        return None
    estimate = statistic([v for g in kept for v in g])
    rng = random.Random(seed)
    drawn: list[float] = []
    for _ in range(max(1, resamples)):
        values: list[float] = []
        for group in rng.choices(kept, k=len(kept)):
            values.extend(group if len(group) == 1 else rng.choices(group, k=len(group)))
        drawn.append(statistic(values))
    drawn.sort()
    tail = (1 - level) / 2
    return Interval(estimate, percentile(drawn, tail), percentile(drawn, 1 - tail), level)


def grouped(rows: Sequence[tuple[str, float]]) -> list[list[float]]:
    """Values grouped by key (a question id), in order of first appearance.

    >>> grouped([("a", 1.0), ("b", 2.0), ("a", 3.0)])
    [[1.0, 3.0], [2.0]]
    """
    groups: dict[str, list[float]] = {}
    for key, value in rows:
        groups.setdefault(key, []).append(value)
    return list(groups.values())


def intervals(
    series: Mapping[str, Sequence[tuple[str, float]]],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> dict[str, dict[str, Interval | None]]:
    """{series: {"geomean": interval, "median": interval}} for (question id, value) rows of each series."""
    return {
        name: {
            stat: bootstrap_interval(grouped(rows), fn, resamples=resamples, level=level, seed=seed)
            for stat, fn in STATISTICS.items()
        }
        for name, rows in series.items()
    }


def bootstrap_settings(resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict[str, Any]:
    """How the intervals were computed, for JSON outputs."""
    return {
        "method": "percentile bootstrap: questions with replacement, then repeats within each drawn question",
        "resamples": resamples,
        "level": level,
        "seed": seed,
    }
