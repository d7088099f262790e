"""The load check repeated (`sot bench --load N --repeat K`): each target over K separate runs, with its spread.

One run of 200 streams on a shared 2-core machine moves by tens of milliseconds from run to run, so a single
run says little about a target of 100 ms. Over K runs, a target on a per-run figure (a latency ratio, the
first content added) is quoted as the median of the runs with a 95% bootstrap interval over them, and is met
when that whole interval is within its limit; the range over the runs and how many runs were within the limit
are shown beside it. A target that every run must meet (no failed request, a few tokens per event at most)
is judged on the worst run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sot.bench.load_report import LoadReport
from sot.eval.spread import Interval, bootstrap_interval, bootstrap_settings

# Targets that hold for every run, judged on the worst one; the others on the interval of their median.
EVERY_RUN = ("failed requests", "tokens per SSE event, max")


@dataclass(frozen=True)
class RepeatedTarget:
    """One target over the runs it applies to: each run's value, and the median's interval over them."""

    name: str
    limit: float
    unit: str
    values: list[float]
    interval: Interval | None  # None for a target judged on the worst run (or that applied to no run)

    @property
    def every_run(self) -> bool:
        return self.name in EVERY_RUN

    @property
    def within(self) -> int:
        """How many runs were within the limit."""
        return sum(value <= self.limit for value in self.values)

    @property
    def passed(self) -> bool | None:
        """Met: every run within the limit (EVERY_RUN), else the whole interval of the median. None: n/a."""
        if not self.values:
            return None
        if self.every_run:
            return self.within == len(self.values)
        return self.interval is not None and self.interval.high <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limit": self.limit,
            "unit": self.unit,
            "values": self.values,
            "median": self.interval.as_dict() if self.interval is not None else None,
            "judged_on": "every run" if self.every_run else "the interval of the median over the runs",
            "within_limit": self.within,
            "passed": self.passed,
        }


@dataclass
class RepeatedLoad:
    """The reports of K runs of the load check with the same settings."""

    reports: list[LoadReport]

    def __post_init__(self) -> None:
        if not self.reports:
            raise ValueError("a repeated load check needs at least one run")

    @property
    def failed(self) -> int:
        return sum(report.failed for report in self.reports)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def targets(self) -> list[RepeatedTarget]:
        """Each target of the runs (in the order one run lists them), over the runs it applies to."""
        by_name: dict[str, list[float]] = {}
        first = {target.name: target for target in self.reports[0].targets()}
        for report in self.reports:
            for target in report.targets():
                values = by_name.setdefault(target.name, [])
                if target.applies:
                    values.append(float(target.value))
        repeated = []
        for name, values in by_name.items():
            judged_on_median = bool(values) and name not in EVERY_RUN
            interval = bootstrap_interval([[v] for v in values], statistics.median) if judged_on_median else None
            repeated.append(RepeatedTarget(name, first[name].limit, first[name].unit, values, interval))
        return repeated

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": [report.to_json() for report in self.reports],
            "targets": [target.to_json() for target in self.targets()],
            "bootstrap": {**bootstrap_settings(), "method": "percentile bootstrap of the median over the runs"},
            "failed": self.failed,
        }


def run_line(index: int, report: LoadReport) -> str:
    """One run in a line: the figures its targets are judged on."""
    accept = report.server.headers_after_accept_p50_ms
    return (
        f"run {index}: failed {report.failed}, latency x{report.latency_ratio_p50:.3f} p50 "
        f"x{report.latency_ratio_p95:.3f} p95, first content {report.added_first_content_ms:+.0f} ms, "
        f"headers {'—' if accept is None else f'{accept:.0f} ms'} after accept, "
        f"tokens/event <= {report.server.tokens_per_event_max}"
    )


def _figure(value: float, target: RepeatedTarget) -> str:
    digits = 0 if target.every_run or target.unit else 3
    return f"{value:.{digits}f}"


def render_repeated(repeated: RepeatedLoad) -> RenderableType:
    """The targets over the runs: median and interval (or the worst run), range, runs within the limit."""
    runs = len(repeated.reports)
    table = Table(title=f"targets over {runs} runs", title_justify="left")
    table.add_column("target", ratio=1)  # the one column that wraps in a narrow console
    for name in ("limit", "median (95% CI)", "range", "within", ""):
        table.add_column(name, justify="left" if not name else "right", no_wrap=True)
    verdict = {True: "[bold green]PASS[/]", False: "[bold red]FAIL[/]", None: "[dim]n/a (SoT)[/]"}
    for target in repeated.targets():
        unit = f" {target.unit}" if target.unit else ""
        if not target.values:
            table.add_row(target.name, f"<= {target.limit:g}{unit}", "", "", "", verdict[None])
            continue
        low, high = min(target.values), max(target.values)
        if target.interval is not None:
            i = target.interval
            figure = f"{_figure(i.estimate, target)} ({_figure(i.low, target)}-{_figure(i.high, target)})"
        else:
            figure = f"worst {_figure(high, target)}"
        table.add_row(
            target.name,
            f"<= {target.limit:g}{unit}",
            figure + unit,
            f"{_figure(low, target)}-{_figure(high, target)}{unit}",
            f"{target.within}/{len(target.values)}",
            verdict[target.passed],
        )
    note = Text(
        "a per-run figure is met when the whole 95% interval of its median over the runs is within the limit; "
        "failures and tokens per event, when every run is",
        style="dim",
    )
    parts: list[RenderableType] = [table, note]
    off = repeated.reports[0].off_reference()
    if off:
        parts.append(Text("targets are set for other settings: " + ", ".join(off), style="yellow"))
    return Group(*parts)
