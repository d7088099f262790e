"""The load check's figures: each side's summary, the ratios side by side, the targets, and their rendering."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sot.bench.load_client import Batch

# The settings the targets are set for (issue #11): 200 streams, 0.5 s to the first token, 40 tokens/s,
# 300-token answers.
REFERENCE = {"n_requests": 200, "ttft": 0.5, "tokens_per_second": 40.0, "answer_tokens": 300, "arrival_rate": 0.0}
MAX_LATENCY_RATIO = 1.05
MAX_ADDED_FIRST_CONTENT_MS = 100.0
MAX_HEADERS_DELAY_MS = 50.0
MAX_TOKENS_PER_EVENT = 3


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile `q` of `values` (0.0 when empty).

    >>> quantile([3.0, 1.0, 2.0], 0.5)
    2.0
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Side:
    """One side of the comparison (direct to the upstream, or through `sot serve`): seconds unless named _ms."""

    label: str
    requests: int
    failed: int
    failures: list[str]  # the first few, verbatim
    total_p50: float
    total_p95: float
    total_max: float
    headers_p50_ms: float
    first_content_p50_ms: float
    first_content_p95_ms: float
    content_events: int
    tokens: int  # words of delta.content the client received, over the successful requests
    tokens_per_event_mean: float
    tokens_per_event_max: int
    wall: float
    upstream_requests: int = 0  # what the upstream counted during this side's batch
    upstream_tokens: int | None = None  # tokens it sent (None: /stats no longer held every request)
    # Through the server: its headers at the client less the upstream's acceptance of the same question's first
    # request, p50 (None: not every request could be matched in the upstream's records).
    headers_after_accept_p50_ms: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds of this batch per process

    @staticmethod
    def of(label: str, batch: Batch) -> Side:
        good = [t for t in batch.traces if t.failure() is None]
        failures = batch.failures
        events = sum(t.content_events for t in good)
        tokens = sum(t.tokens for t in good)
        return Side(
            label=label,
            requests=len(batch.traces),
            failed=len(failures),
            failures=failures[:5],
            total_p50=quantile([t.total or 0.0 for t in good], 0.5),
            total_p95=quantile([t.total or 0.0 for t in good], 0.95),
            total_max=max((t.total or 0.0 for t in good), default=0.0),
            headers_p50_ms=1000 * quantile([t.headers or 0.0 for t in good], 0.5),
            first_content_p50_ms=1000 * quantile([t.first_content or 0.0 for t in good], 0.5),
            first_content_p95_ms=1000 * quantile([t.first_content or 0.0 for t in good], 0.95),
            content_events=events,
            tokens=tokens,
            tokens_per_event_mean=tokens / events if events else 0.0,
            tokens_per_event_max=max((t.max_tokens_per_event for t in good), default=0),
            wall=batch.wall,
        )

    def cpu_per_1k(self, process: str) -> float | None:
        """CPU-seconds of `process` per 1,000 tokens this side streamed."""
        if process not in self.cpu or not self.tokens:
            return None
        return 1000 * self.cpu[process] / self.tokens


@dataclass(frozen=True)
class Target:
    """One target: `value` against `limit` (at most), or None when it does not apply to this run."""

    name: str
    value: float
    limit: float
    unit: str = ""
    applies: bool = True

    @property
    def passed(self) -> bool | None:
        return self.value <= self.limit if self.applies else None


@dataclass
class LoadReport:
    """Direct and through the server, in one run; `settings` are the load check's own."""

    settings: dict[str, Any]
    upstream: dict[str, Any]  # the test upstream's options
    direct: Side
    server: Side

    @property
    def failed(self) -> int:
        return self.direct.failed + self.server.failed

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def latency_ratio_p50(self) -> float:
        return _ratio(self.server.total_p50, self.direct.total_p50)

    @property
    def latency_ratio_p95(self) -> float:
        return _ratio(self.server.total_p95, self.direct.total_p95)

    @property
    def added_first_content_ms(self) -> float:
        """What the server adds to the time to first content, at p50."""
        return self.server.first_content_p50_ms - self.direct.first_content_p50_ms

    @property
    def headers_delay_ms(self) -> float:
        """How much later the server's headers arrive than the upstream's in the direct batch, at p50: everything
        the server adds before its headers, the intake of a burst of requests included."""
        return self.server.headers_p50_ms - self.direct.headers_p50_ms

    def targets(self) -> list[Target]:
        """Issue #11's targets. In SoT mode only "no failure" is one: SoT answers are not like for like."""
        normal = self.settings["mode"] == "normal"
        return [
            Target("failed requests", self.failed, 0),
            Target("latency ratio p50 (server / direct)", self.latency_ratio_p50, MAX_LATENCY_RATIO, applies=normal),
            Target("latency ratio p95 (server / direct)", self.latency_ratio_p95, MAX_LATENCY_RATIO, applies=normal),
            Target("first content added, p50", self.added_first_content_ms, MAX_ADDED_FIRST_CONTENT_MS, "ms", normal),
            Target(
                "headers after the upstream accepted, p50",
                self.server.headers_after_accept_p50_ms or 0.0,
                MAX_HEADERS_DELAY_MS,
                "ms",
                normal and self.server.headers_after_accept_p50_ms is not None,
            ),
            Target("tokens per SSE event, max", self.server.tokens_per_event_max, MAX_TOKENS_PER_EVENT, applies=normal),
        ]

    def off_reference(self) -> list[str]:
        """The settings where this run differs from the ones the targets are set for."""
        return [
            f"{k} {self.settings.get(k, 0.0):g} (targets: {v:g})"
            for k, v in REFERENCE.items()
            if self.settings.get(k, 0.0) != v
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "upstream": self.upstream,
            "direct": asdict(self.direct),
            "server": asdict(self.server),
            "cpu_per_1k_tokens": {
                "upstream_direct": self.direct.cpu_per_1k("upstream"),
                "upstream_via_server": self.server.cpu_per_1k("upstream"),
                "server": self.server.cpu_per_1k("server"),
            },
            "ratios": {
                "latency_p50": self.latency_ratio_p50,
                "latency_p95": self.latency_ratio_p95,
                "added_first_content_p50_ms": self.added_first_content_ms,
                "headers_delay_p50_ms": self.headers_delay_ms,
                "headers_after_accept_p50_ms": self.server.headers_after_accept_p50_ms,
            },
            "targets": [{**asdict(t), "passed": t.passed} for t in self.targets()],
            "failed": self.failed,
        }


def arrivals(settings: dict[str, Any]) -> str:
    """How the requests were sent: "sent at once" or "arriving at R/s (Poisson)"."""
    rate = settings.get("arrival_rate", 0.0)
    return f"arriving at {rate:g}/s (Poisson)" if rate else "sent at once"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rows(report: LoadReport) -> list[tuple[str, str, str, str]]:
    d, s = report.direct, report.server
    n = report.settings["n_requests"]
    rows = [
        ("ok / failed", f"{d.requests - d.failed}/{d.failed}", f"{s.requests - s.failed}/{s.failed}", ""),
        ("latency p50 s", _num(d.total_p50), _num(s.total_p50), f"{report.latency_ratio_p50:.3f}x"),
        ("latency p95 s", _num(d.total_p95), _num(s.total_p95), f"{report.latency_ratio_p95:.3f}x"),
        ("latency max s", _num(d.total_max), _num(s.total_max), ""),
        ("headers p50 ms", _num(d.headers_p50_ms, 1), _num(s.headers_p50_ms, 1), f"{report.headers_delay_ms:+.1f}"),
        ("headers after upstream accepted p50 ms", "", _num(s.headers_after_accept_p50_ms, 1), ""),
        (
            "first content p50 ms",
            _num(d.first_content_p50_ms, 0),
            _num(s.first_content_p50_ms, 0),
            f"{report.added_first_content_ms:+.0f}",
        ),
        ("first content p95 ms", _num(d.first_content_p95_ms, 0), _num(s.first_content_p95_ms, 0), ""),
        ("content events / request", _num(d.content_events / n, 1), _num(s.content_events / n, 1), ""),
        ("tokens / event mean, max", _per_event(d), _per_event(s), ""),
        ("tokens recv / upstream", _tokens(d), _tokens(s), ""),
        ("upstream requests", str(d.upstream_requests), str(s.upstream_requests), ""),
        ("batch wall s", _num(d.wall), _num(s.wall), ""),
    ]
    for process in ("upstream", "server", "client"):
        if process in d.cpu or process in s.cpu:
            rows.append((f"{process} CPU s", _cpu(d, process), _cpu(s, process), ""))
            rows.append((f"{process} CPU s / 1k tokens", _cpu(d, process, 1000), _cpu(s, process, 1000), ""))
    return rows


def _per_event(side: Side) -> str:
    return f"{side.tokens_per_event_mean:.2f}, {side.tokens_per_event_max}"


def _tokens(side: Side) -> str:
    return f"{side.tokens}/{'—' if side.upstream_tokens is None else side.upstream_tokens}"


def _cpu(side: Side, process: str, per: int = 0) -> str:
    if process not in side.cpu:
        return "—"
    return _num(side.cpu_per_1k(process), 3) if per else f"{side.cpu[process]:.2f}"


def _targets_table(report: LoadReport) -> Table:
    table = Table(title="targets", title_justify="left")
    for name, justify in (("target", "left"), ("limit", "right"), ("measured", "right"), ("", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for target in report.targets():
        verdict = {True: "[bold green]PASS[/]", False: "[bold red]FAIL[/]", None: "[dim]n/a (SoT)[/]"}
        digits = 0 if target.name.startswith(("failed", "tokens")) else (1 if target.unit else 3)
        table.add_row(
            target.name,
            f"<= {target.limit:g} {target.unit}".rstrip(),
            f"{target.value:.{digits}f} {target.unit}".rstrip(),
            verdict[target.passed],
        )
    return table


def render_load_report(report: LoadReport) -> RenderableType:
    """The side-by-side table, the targets, the settings and the first failures."""
    settings, up = report.settings, report.upstream
    table = Table(
        title=f"sot serve load check: {settings['n_requests']} streamed requests {arrivals(settings)}, "
        f"{settings['mode']} mode, {settings.get('workers', 1)} worker(s) (direct first, then through the server)",
        caption="times from opening the connection; a token is a word, as the upstream streams it; "
        "server/direct: ratio, or difference in ms",
    )
    for name in ("measure", "direct", "via server", "server/direct"):
        table.add_column(name, justify="left" if name == "measure" else "right", no_wrap=True)
    for row in _rows(report):
        table.add_row(*row)
    parts: list[RenderableType] = [table, _targets_table(report)]
    parts.append(
        Text(
            f"upstream: first token after {up['ttft']:g} s, {up['tokens_per_second']:g} tokens/s, full answer "
            f"{settings['answer_tokens']} tokens, {up['skeleton_points']} skeleton points of "
            f"{up['tokens_per_answer']} tokens, jitter {up['tokens_jitter']:g}",
            style="dim",
        )
    )
    off = report.off_reference()
    if off:
        parts.append(Text("targets are set for other settings: " + ", ".join(off), style="yellow"))
    for side in (report.direct, report.server):
        parts.extend(Text(f"  {side.label}: {failure}", style="red") for failure in side.failures)
    return Group(*parts)
