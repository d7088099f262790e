"""How well a router routes: accuracy, precision, recall and the false-SoT rate, overall and per category.

Pure functions over labels and predictions (True = "use SoT"); no I/O and no router in sight, so the
`sot router eval` command, the training script's cross-validation and the eval harness all count alike.
The false-SoT rate, FP / (FP + TN), is the one to watch: it is the share of questions that should have been
answered normally (math, code, short answers) but were given a skeleton, the costly mistake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def _ratio(num: int, den: int) -> float | None:
    # Undefined (no predicted SoT, no actual negatives) is reported as None, not as 0: a router that never
    # says SoT has no precision rather than a bad one.
    return num / den if den else None


@dataclass(frozen=True)
class Confusion:
    """Counts of one 2x2 confusion matrix, positive = "use SoT"."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def false_sot_rate(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def matrix(self) -> list[list[int]]:
        """Rows are the truth (normal, sot), columns the prediction (normal, sot)."""
        return [[self.tn, self.fp], [self.fn, self.tp]]

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "false_sot_rate": self.false_sot_rate,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "confusion_matrix": {"labels": ["normal", "sot"], "rows": "truth", "matrix": self.matrix},
        }


@dataclass(frozen=True)
class RouterMetrics:
    """The overall confusion, and one per category when the data has categories."""

    overall: Confusion
    by_category: dict[str, Confusion] = field(default_factory=dict)

    @property
    def majority_baseline(self) -> float | None:
        """Accuracy of always answering the more common label: the bar a router must clear."""
        positives = self.overall.tp + self.overall.fn
        return _ratio(max(positives, self.overall.n - positives), self.overall.n)

    def subset(self, categories: Sequence[str]) -> Confusion:
        """The pooled confusion of some categories (e.g. the ones where SoT must never be chosen)."""
        total = Confusion()
        for name in categories:
            total = total + self.by_category.get(name, Confusion())
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "majority_baseline": self.majority_baseline,
            "by_category": {name: c.to_dict() for name, c in self.by_category.items()},
        }


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default); None when `n` is 0.

    >>> [round(x, 3) for x in wilson_interval(68, 80)]
    [0.756, 0.912]
    """
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion(labels: Sequence[bool], predictions: Sequence[bool]) -> Confusion:
    """Count a confusion matrix.

    >>> confusion([True, True, False, False], [True, False, True, False])
    Confusion(tp=1, fp=1, fn=1, tn=1)
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    tp = fp = fn = tn = 0
    for truth, predicted in zip(labels, predictions, strict=True):
        if predicted:
            tp, fp = (tp + 1, fp) if truth else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if truth else (fn, tn + 1)
    return Confusion(tp=tp, fp=fp, fn=fn, tn=tn)


def compute_metrics(
    labels: Sequence[bool],
    predictions: Sequence[bool],
    categories: Sequence[str | None] | None = None,
) -> RouterMetrics:
    """Metrics of a router's predictions against labels; per category when `categories` is given.

    Categories keep the order in which they first appear; a missing category (None) is not grouped.
    """
    overall = confusion(labels, predictions)
    by_category: dict[str, Confusion] = {}
    if categories is not None:
        if len(categories) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(categories)} categories")
        grouped: dict[str, tuple[list[bool], list[bool]]] = {}
        for truth, predicted, name in zip(labels, predictions, categories, strict=True):
            if name is None:
                continue
            truths, preds = grouped.setdefault(name, ([], []))
            truths.append(truth)
            preds.append(predicted)
        by_category = {name: confusion(t, p) for name, (t, p) in grouped.items()}
    return RouterMetrics(overall=overall, by_category=by_category)
