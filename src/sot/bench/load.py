"""Load check of `sot serve`: many concurrent streamed requests through the server, against the same requests
sent straight to the upstream, on a local test upstream; reports failures and the latency the server adds.

It starts its own processes (the test upstream and `sot serve` in front of it, on free 127.0.0.1 ports) and
stops them. It measures the server, not a model: the upstream's answers are scripted and timed. It does not
register a command; `sot bench` calls `run_load_check` and prints `render_load_report`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import openai
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sot.testing.process import ServiceProcess, fetch_json, free_port, serve_command, upstream_command

# -- measurement ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySummary:
    """Per-request times of one batch, in seconds."""

    count: int
    mean: float
    p50: float
    p95: float
    max: float
    ttft_p50: float
    wall: float  # the whole batch, first request sent to last one finished

    @staticmethod
    def of(totals: list[float], ttfts: list[float], wall: float) -> LatencySummary:
        if not totals:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, wall)
        ordered = sorted(totals)
        return LatencySummary(
            count=len(totals),
            mean=statistics.fmean(totals),
            p50=_quantile(ordered, 0.5),
            p95=_quantile(ordered, 0.95),
            max=ordered[-1],
            ttft_p50=_quantile(sorted(ttfts), 0.5) if ttfts else 0.0,
            wall=wall,
        )


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class LoadReport:
    """What the load check saw. `ratio` is the server's latency over the upstream's (1.0: it adds nothing)."""

    n_requests: int
    mode: str
    upstream: dict[str, Any]
    direct: LatencySummary
    via_server: LatencySummary
    failed: int
    failures: list[str] = field(default_factory=list)  # the first few, verbatim
    upstream_requests: int = 0  # what the upstream counted during the server phase

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.via_server.count == self.n_requests

    @property
    def ratio(self) -> float:
        """Mean per-request latency through the server over the mean straight to the upstream."""
        return self.via_server.mean / self.direct.mean if self.direct.mean else float("inf")

    @property
    def added_ms(self) -> float:
        """Mean latency the server adds to a request, in milliseconds."""
        return (self.via_server.mean - self.direct.mean) * 1000


async def _one(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int) -> tuple[float, float]:
    """One streamed request to its end; (total seconds, seconds to the first content). Raises on any failure."""
    start = time.perf_counter()
    first: float | None = None
    finish: str | None = None
    content = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            content += len(choice.delta.content)
            if first is None:
                first = time.perf_counter() - start
        if choice.finish_reason:
            finish = choice.finish_reason
    if finish is None or content == 0:
        raise RuntimeError(f"the stream ended without {'content' if finish else 'a finish_reason'}")
    return time.perf_counter() - start, first or 0.0


async def _batch(base_url: str, model: str, n: int, max_tokens: int, failures: list[str]) -> tuple[LatencySummary, int]:
    # One client, as an application would have; its default pool (1000 connections) covers the batch.
    client = openai.AsyncOpenAI(base_url=base_url, api_key="load-check", max_retries=0, timeout=120.0)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(_one(client, model, f"Question {i}: what matters most about topic {i}?", max_tokens) for i in range(n)),
            return_exceptions=True,
        )
        wall = time.perf_counter() - start
    finally:
        await client.close()
    totals: list[float] = []
    ttfts: list[float] = []
    failed = 0
    for item in results:
        if isinstance(item, BaseException):
            failed += 1
            if len(failures) < 5:
                failures.append(f"{type(item).__name__}: {item}")
        else:
            totals.append(item[0])
            ttfts.append(item[1])
    return LatencySummary.of(totals, ttfts, wall), failed


def _upstream_counters(root_url: str) -> dict[str, Any]:
    data: dict[str, Any] = fetch_json(root_url + "/stats")
    return data


async def run_load_check(
    n_requests: int = 200,
    *,
    mode: str = "normal",
    ttft: float = 0.2,
    tokens_per_second: float = 20.0,
    answer_tokens: int = 40,
    warmup: int = 4,
) -> LoadReport:
    """`n_requests` concurrent streamed requests straight to a local test upstream, then as many through
    `sot serve` in front of it; none may fail. Each answer is `answer_tokens` tokens, the first after `ttft`
    seconds, then `tokens_per_second`, as an API model streams.

    `mode` is the server's mode for the requests; the default, "normal", sends each request upstream once,
    so the comparison with the direct call is like for like and the ratio is the server's own overhead.
    """
    if n_requests < 1:
        raise ValueError("n_requests must be at least 1")
    upstream_options = {
        "ttft": ttft,
        "tokens_per_second": tokens_per_second,
        # A direct request is a "full" answer (factor x tokens_per_answer): keep it exactly answer_tokens.
        "tokens_per_answer": answer_tokens,
        "full_answer_factor": 1.0,
    }
    upstream = ServiceProcess(upstream_command(free_port(), **upstream_options), name="load-upstream")
    upstream.launch()
    server: ServiceProcess | None = None
    try:
        upstream_url = await asyncio.to_thread(upstream.wait_ready)
        server = ServiceProcess(
            serve_command(
                backend="openai",
                base_url=upstream_url,
                model="test",
                mode=mode,
                max_concurrency=n_requests + warmup + 16,
                max_tokens_limit=max(4096, answer_tokens * 4),
            ),
            name="load-serve",
        )
        server_url = await asyncio.to_thread(server.start) + "/v1"
        failures: list[str] = []
        max_tokens = answer_tokens * 4  # never the limit: every answer ends with "stop"
        # Warm both paths (connections, first-request imports) so the batches measure steady state.
        await _batch(upstream_url, "test", warmup, max_tokens, [])
        await _batch(server_url, f"{mode}:test", warmup, max_tokens, [])
        direct, direct_failed = await _batch(upstream_url, "test", n_requests, max_tokens, failures)
        before = await asyncio.to_thread(_upstream_counters, upstream.root_url)
        via, via_failed = await _batch(server_url, f"{mode}:test", n_requests, max_tokens, failures)
        after = await asyncio.to_thread(_upstream_counters, upstream.root_url)
        return LoadReport(
            n_requests=n_requests,
            mode=mode,
            upstream=upstream_options,
            direct=direct,
            via_server=via,
            failed=direct_failed + via_failed,
            failures=failures,
            upstream_requests=int(after["started"]) - int(before["started"]),
        )
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(upstream.stop)


def render_load_report(report: LoadReport) -> RenderableType:
    """A table of both batches and a one-line verdict."""
    table = Table(
        title=f"sot serve load check: {report.n_requests} concurrent streamed requests ({report.mode} mode)",
        caption="seconds per request; TTFT: time to the first content; wall: the whole batch",
    )
    table.add_column("path", no_wrap=True)
    for name in ("ok", "mean", "p50", "p95", "max", "TTFT p50", "wall"):
        table.add_column(name, justify="right", no_wrap=True)
    for label, s in (("direct", report.direct), ("via sot serve", report.via_server)):
        table.add_row(
            label,
            f"{s.count}/{report.n_requests}",
            *(f"{v:.2f}" for v in (s.mean, s.p50, s.p95, s.max, s.ttft_p50, s.wall)),
        )
    style = "green" if report.ok else "red"
    verdict = Text.assemble(
        ("PASS" if report.ok else "FAIL", f"bold {style}"),
        f"  {report.failed} failed · latency ratio {report.ratio:.3f} (server / direct) · "
        f"{report.added_ms:+.1f} ms per request · {report.upstream_requests} upstream requests",
    )
    upstream = report.upstream
    note = Text(
        f"upstream: first token after {upstream['ttft']} s, {upstream['tokens_per_second']} tokens/s, "
        f"{upstream['tokens_per_answer']} tokens per answer",
        style="dim",
    )
    parts: list[RenderableType] = [table, verdict, note]
    parts.extend(Text(f"  {failure}", style="red") for failure in report.failures)
    return Group(*parts)
