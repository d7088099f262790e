"""Prometheus metrics of `sot serve` (`--metrics`, at /metrics): questions by mode and outcome, fallbacks by
kind, refusals, questions in flight, upstream requests per question, and the time and token histograms.

With several workers the supervisor sets `PROMETHEUS_MULTIPROC_DIR`; each worker then writes its values
there and /metrics, whichever worker answers it, adds up every worker's (`MultiProcessCollector`).
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from sot.server.observe import RequestRecord, fallback_kind

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
REQUESTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
POINTS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    """Whether values go to `PROMETHEUS_MULTIPROC_DIR`, shared by every worker."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The server's metrics, in a registry of their own (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sot_requests",
            "Questions answered (chat completions and event streams), by mode requested, mode used "
            "(none: no answer) and outcome (ok, error, rejected, invalid, cancelled).",
            ["mode_requested", "mode_used", "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sot_fallbacks",
            "SoT answers that fell back to normal decoding, by kind of reason "
            "(skeleton_failed, too_few_points, point_failed, other).",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "sot_rejected_requests",
            "Questions the server refused itself: overloaded (429, --max-concurrency) or draining (503).",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sot_in_flight_requests",
            "Questions being answered now (summed over live workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_requests = Histogram(
            "sot_upstream_requests_per_question",
            "Requests sent upstream for one answered question (skeleton, points, retries, fallback).",
            buckets=REQUESTS,
            registry=r,
        )
        self.points = Histogram(
            "sot_points_per_question", "Skeleton points of an answer given with SoT.", buckets=POINTS, registry=r
        )
        self._histograms(r)
        self.tokens = Counter(
            "sot_tokens",
            "Tokens of answered questions, as usage reports them (prompt, completion).",
            ["kind"],
            registry=r,
        )

    def _histograms(self, registry: CollectorRegistry) -> None:
        def seconds(name: str, text: str) -> Histogram:
            return Histogram(name, text, buckets=SECONDS, registry=registry)

        self.ttft = seconds(
            "sot_time_to_first_token_seconds",
            "From the start of a run to the first token from upstream (in SoT mode, the skeleton's).",
        )
        self.first_answer = seconds(
            "sot_first_answer_seconds",
            "From a question's arrival to the first text of its answer (what a client waits).",
        )
        self.skeleton = seconds("sot_skeleton_seconds", "Time to write and parse the skeleton (SoT runs).")
        self.slowest_point = seconds(
            "sot_slowest_point_seconds", "The longest point expansion of a SoT answer (it bounds the answer's end)."
        )
        self.total = seconds("sot_total_seconds", "A run from start to its last token.")

    def question_started(self) -> None:
        self.in_flight.inc()

    def question_ended(self) -> None:
        self.in_flight.dec()

    def observe(self, record: RequestRecord) -> None:
        """Count a finished request (only the answer endpoints count)."""
        if not record.question:
            return
        result = record.result
        used = result.mode_used if result is not None else "none"
        self.requests.labels(record.mode_requested or "unknown", used, record.outcome).inc()
        if record.rejected:
            self.rejected.labels(record.rejected).inc()
        if result is None:
            return
        kind = fallback_kind(result.fallback_reason)
        if kind is not None:
            self.fallbacks.labels(kind).inc()
        stats = result.stats
        self.upstream_requests.observe(stats.requests)
        self.tokens.labels("prompt").inc(stats.prompt_tokens)
        self.tokens.labels("completion").inc(stats.completion_tokens)
        self.total.observe(stats.total_seconds)
        if record.first_answer is not None:
            self.first_answer.observe(record.first_answer - record.started)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
        if stats.skeleton_seconds is not None:
            self.skeleton.observe(stats.skeleton_seconds)
        if result.mode_used == "sot" and stats.points:
            self.slowest_point.observe(stats.slowest_point_seconds)
            self.points.observe(len(result.points))

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (of every worker, in multi-process mode) and its content type."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
