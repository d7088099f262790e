"""The arithmetic of an evaluation, as pure functions: speed-ups, judge verdicts, net win rates, router scores.

No I/O and no models: inputs are numbers and verdicts, so every convention is testable by hand.

Conventions:
- speed-up of one question = normal latency / candidate latency (> 1 means the candidate was faster);
  aggregated by median and by geometric mean (the mean of ratios that treats x2 and x0.5 symmetrically).
- equal-length speed-up = the time normal decoding took to produce as many tokens as the candidate's answer
  has, / the candidate's latency. It separates "SoT is faster" from "SoT wrote less". Defined once, in
  `sot.eval.equal_length` (per-chunk timestamps, no extrapolation past the normal answer's end).
- one judged order gives the candidate `win` / `tie` / `lose` by comparing the two scores; an order whose
  reply could not be parsed is `unparsable`.
- a pair (both orders) is a win or a loss only when both orders agree; any disagreement (win + tie,
  win + lose) is a tie. This is FastChat's pairwise convention ("inconsistent" counts as a tie), which
  cancels position bias. If either order is unparsable the pair is `unparsable`: one order alone cannot
  cancel position bias, so we do not guess.
- rates are over judged pairs (win + tie + lose); unparsable pairs are excluded from the denominators but
  counted and reported. net win rate = win rate - lose rate = (wins - losses) / judged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["win", "tie", "lose", "unparsable"]
VERDICTS: tuple[Verdict, ...] = ("win", "tie", "lose", "unparsable")


# -- speed ---------------------------------------------------------------------------------------------


def speedup(normal_seconds: float, candidate_seconds: float) -> float:
    """Normal latency over candidate latency.

    >>> speedup(6.0, 2.0)
    3.0
    """
    if normal_seconds <= 0 or candidate_seconds <= 0:
        raise ValueError("latencies must be positive")
    return normal_seconds / candidate_seconds


def geometric_mean(values: Iterable[float]) -> float | None:
    """exp(mean(log v)); None for no values.

    >>> round(geometric_mean([2.0, 0.5]), 9)
    1.0
    """
    logs = [math.log(v) for v in values]
    if not logs:
        return None
    return math.exp(sum(logs) / len(logs))


def median(values: Iterable[float]) -> float | None:
    """The median; None for no values."""
    items = list(values)
    return statistics.median(items) if items else None


@dataclass(frozen=True)
class Distribution:
    """Summary of a set of positive ratios or latencies."""

    n: int
    median: float | None
    geomean: float | None
    mean: float | None
    min: float | None
    max: float | None
    p90: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        items = sorted(values)
        if not items:
            return cls(0, None, None, None, None, None, None)
        return cls(
            n=len(items),
            median=statistics.median(items),
            geomean=geometric_mean(items) if items[0] > 0 else None,
            mean=statistics.fmean(items),
            min=items[0],
            max=items[-1],
            p90=percentile(items, 0.9),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "median": self.median,
            "geomean": self.geomean,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "p90": self.p90,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 1]).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def by_category(rows: Iterable[tuple[str, float]]) -> tuple[dict[str, Distribution], Distribution]:
    """Per-category distributions (categories sorted) and the overall one."""
    groups: dict[str, list[float]] = {}
    everything: list[float] = []
    for category, value in rows:
        groups.setdefault(category, []).append(value)
        everything.append(value)
    return {c: Distribution.of(groups[c]) for c in sorted(groups)}, Distribution.of(everything)


# -- judged quality ------------------------------------------------------------------------------------


def order_verdict(scores: tuple[float, float] | None, *, candidate_first: bool) -> Verdict:
    """The candidate's outcome in one order, from the judge's (Assistant 1, Assistant 2) scores.

    >>> order_verdict((8, 6), candidate_first=True), order_verdict((8, 6), candidate_first=False)
    ('win', 'lose')
    """
    if scores is None:
        return "unparsable"
    first, second = scores
    candidate, baseline = (first, second) if candidate_first else (second, first)
    if candidate > baseline:
        return "win"
    if candidate < baseline:
        return "lose"
    return "tie"


def combine_orders(first: Verdict, second: Verdict) -> Verdict:
    """One verdict for a pair judged in both orders (see the module docstring).

    >>> combine_orders("win", "win"), combine_orders("win", "tie"), combine_orders("win", "lose")
    ('win', 'tie', 'tie')
    >>> combine_orders("lose", "unparsable")
    'unparsable'
    """
    if first == "unparsable" or second == "unparsable":
        return "unparsable"
    if first == second:
        return first
    return "tie"


@dataclass(frozen=True)
class VerdictCounts:
    """Wins, ties, losses and unparsable pairs of a candidate against the baseline."""

    win: int = 0
    tie: int = 0
    lose: int = 0
    unparsable: int = 0

    @classmethod
    def of(cls, verdicts: Iterable[Verdict]) -> VerdictCounts:
        counts = dict.fromkeys(VERDICTS, 0)
        for v in verdicts:
            counts[v] += 1
        return cls(**counts)

    @property
    def judged(self) -> int:
        """Pairs with a usable verdict: the denominator of every rate."""
        return self.win + self.tie + self.lose

    def _rate(self, count: int) -> float | None:
        return count / self.judged if self.judged else None

    @property
    def win_rate(self) -> float | None:
        return self._rate(self.win)

    @property
    def tie_rate(self) -> float | None:
        return self._rate(self.tie)

    @property
    def lose_rate(self) -> float | None:
        return self._rate(self.lose)

    @property
    def net_win_rate(self) -> float | None:
        """Win rate minus lose rate, in [-1, 1]; None when nothing was judged.

        >>> VerdictCounts(win=3, tie=1, lose=1, unparsable=5).net_win_rate
        0.4
        """
        return self._rate(self.win - self.lose)

    def as_dict(self) -> dict[str, Any]:
        return {
            "win": self.win,
            "tie": self.tie,
            "lose": self.lose,
            "unparsable": self.unparsable,
            "judged": self.judged,
            "win_rate": self.win_rate,
            "tie_rate": self.tie_rate,
            "lose_rate": self.lose_rate,
            "net_win_rate": self.net_win_rate,
        }


def verdicts_by_category(rows: Iterable[tuple[str, Verdict]]) -> tuple[dict[str, VerdictCounts], VerdictCounts]:
    """Per-category counts (categories sorted) and the overall counts."""
    groups: dict[str, list[Verdict]] = {}
    everything: list[Verdict] = []
    for category, verdict in rows:
        groups.setdefault(category, []).append(verdict)
        everything.append(verdict)
    return {c: VerdictCounts.of(groups[c]) for c in sorted(groups)}, VerdictCounts.of(everything)


# -- routing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterCounts:
    """The router's choices against human labels; "positive" means "use SoT"."""

    true_sot: int = 0  # labelled suitable, routed to SoT
    false_sot: int = 0  # labelled unsuitable, routed to SoT
    true_normal: int = 0  # labelled unsuitable, routed to normal
    false_normal: int = 0  # labelled suitable, routed to normal
    unlabelled_sot: int = 0
    unlabelled_normal: int = 0

    @classmethod
    def of(cls, rows: Iterable[tuple[bool | None, bool]]) -> RouterCounts:
        """From (label, routed_to_sot) pairs; a None label counts as unlabelled."""
        c = dict.fromkeys(
            ("true_sot", "false_sot", "true_normal", "false_normal", "unlabelled_sot", "unlabelled_normal"), 0
        )
        for label, routed_sot in rows:
            if label is None:
                c["unlabelled_sot" if routed_sot else "unlabelled_normal"] += 1
            elif label and routed_sot:
                c["true_sot"] += 1
            elif label:
                c["false_normal"] += 1
            elif routed_sot:
                c["false_sot"] += 1
            else:
                c["true_normal"] += 1
        return cls(**c)

    @property
    def labelled(self) -> int:
        return self.true_sot + self.false_sot + self.true_normal + self.false_normal

    @property
    def accuracy(self) -> float | None:
        return (self.true_sot + self.true_normal) / self.labelled if self.labelled else None

    @property
    def precision(self) -> float | None:
        """Of the questions sent to SoT, the share labelled suitable."""
        routed = self.true_sot + self.false_sot
        return self.true_sot / routed if routed else None

    @property
    def recall(self) -> float | None:
        """Of the questions labelled suitable, the share sent to SoT."""
        suitable = self.true_sot + self.false_normal
        return self.true_sot / suitable if suitable else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "true_sot": self.true_sot,
            "false_sot": self.false_sot,
            "true_normal": self.true_normal,
            "false_normal": self.false_normal,
            "unlabelled_sot": self.unlabelled_sot,
            "unlabelled_normal": self.unlabelled_normal,
            "labelled": self.labelled,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
        }


def routes_by_category(
    rows: Iterable[tuple[str, bool | None, bool]],
) -> tuple[dict[str, RouterCounts], RouterCounts]:
    """Per-category router counts from (category, label, routed_to_sot), and the overall counts."""
    groups: dict[str, list[tuple[bool | None, bool]]] = {}
    everything: list[tuple[bool | None, bool]] = []
    for category, label, routed in rows:
        groups.setdefault(category, []).append((label, routed))
        everything.append((label, routed))
    return {c: RouterCounts.of(groups[c]) for c in sorted(groups)}, RouterCounts.of(everything)


def as_dicts(table: Mapping[str, Distribution | VerdictCounts | RouterCounts]) -> dict[str, dict[str, Any]]:
    """A per-category table as plain JSON-ready dicts."""
    return {key: value.as_dict() for key, value in table.items()}
