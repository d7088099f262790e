"""Load check of `sot serve`: concurrent streamed requests straight to a test upstream, then through the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from typing import Any

from sot.bench.load_client import StreamTrace, arrival_offsets, chat_body, run_batch
from sot.bench.load_report import LoadReport, Side, quantile, render_load_report
from sot.testing.process import (
    ServiceProcess,
    child_processes,
    fetch_json,
    proc_stat,
    serve_command,
    upstream_command,
)

__all__ = ["LoadReport", "Side", "cpu_seconds", "render_load_report", "run_load_check", "upstream_options"]

SKELETON_POINTS = 5  # the test upstream's default
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far, from /proc/PID/stat (Linux)."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15: utime, stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` and of all its living descendants (`sot serve --workers N`: the workers)."""
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [child for child in child_processes(frontier.pop()) if child not in tree]
        tree.update(children)
        frontier += children
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def process_id(process: ServiceProcess) -> int:
    """The operating system's id of a launched `ServiceProcess`."""
    if process._proc is None:
        raise RuntimeError(f"{process.name} is not running")
    return process._proc.pid


def upstream_options(
    answer_tokens: int, ttft: float, tokens_per_second: float, jitter: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """Test upstream options: full answers of exactly `answer_tokens`, points of a fifth of that.

    >>> o = upstream_options(300, 0.5, 40.0)
    >>> o["tokens_per_answer"], round(o["tokens_per_answer"] * o["full_answer_factor"])
    (60, 300)
    """
    point_tokens = max(1, round(answer_tokens / SKELETON_POINTS))
    return {
        "ttft": ttft,
        "tokens_per_second": tokens_per_second,
        "skeleton_points": SKELETON_POINTS,
        "tokens_per_answer": point_tokens,
        "full_answer_factor": answer_tokens / point_tokens,
        "tokens_jitter": jitter,
        **extra,
    }


async def _measure(label: str, url: str, model: str, n: int, settings: dict[str, Any], pids: dict[str, int]) -> Side:
    """One batch of `n` concurrent requests to `url`, with the upstream's counts and each process's CPU time."""
    root = settings["upstream_root"]
    bodies = [
        chat_body(model, f"Question {i}: what matters most about topic {i}?", settings["max_tokens"]) for i in range(n)
    ]
    await asyncio.to_thread(fetch_json, root + "/stats/reset", method="POST")
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    offsets = arrival_offsets(n, settings["arrival_rate"]) if label != "warm-up" else ()
    batch = await run_batch(url + "/chat/completions", bodies, settings["request_timeout"], offsets)
    cpu = {name: tree_cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - client_before
    stats = await asyncio.to_thread(fetch_json, root + "/stats")
    side = Side.of(label, batch)
    side.cpu = cpu
    side.upstream_requests = int(stats["started"])
    records = stats["requests"]
    if len(records) == side.upstream_requests:  # /stats keeps the last 500 requests only
        side.upstream_tokens = sum(int(r["completion_tokens"]) for r in records)
        if pids.get("server"):
            side.headers_after_accept_p50_ms = headers_after_accept_ms(batch.traces, records)
    return side


_QUESTION = re.compile(r"Question (\d+):")


def headers_after_accept_ms(traces: list[StreamTrace], records: list[dict[str, Any]]) -> float | None:
    """p50 over requests of: when the server's response headers reached the client, less when the upstream took
    the first request of the same question (the test upstream answers with its headers at once). Both are
    CLOCK_MONOTONIC readings of processes on this machine. None unless every successful request is matched."""
    accepted: dict[int, float] = {}
    for record in records:
        found = _QUESTION.search(record.get("last_user") or "")
        if found and record.get("started_monotonic"):
            index = int(found.group(1))
            accepted[index] = min(accepted.get(index, float("inf")), float(record["started_monotonic"]))
    delays = []
    for index, trace in enumerate(traces):
        if trace.failure() is None and trace.headers is not None:
            if index not in accepted:
                return None
            delays.append(1000 * (trace.opened + trace.headers - accepted[index]))
    return quantile(delays, 0.5) if delays else None


async def _start(upstream: ServiceProcess, n_requests: int, settings: dict[str, Any]) -> ServiceProcess:
    upstream_url = await asyncio.to_thread(upstream.wait_ready)
    settings["upstream_root"] = upstream.root_url
    server = ServiceProcess(
        serve_command(
            backend="openai",
            base_url=upstream_url,
            model="test",
            mode=settings["mode"],
            max_concurrency=n_requests + settings["warmup"] + 16,
            workers=settings["workers"] if settings["workers"] > 1 else None,
            max_tokens_limit=max(4096, settings["max_tokens"]),
        ),
        name="load-serve",
    )
    await asyncio.to_thread(server.start)
    return server


async def run_load_check(
    n_requests: int = 200,
    *,
    mode: str = "normal",
    ttft: float = 0.5,
    tokens_per_second: float = 40.0,
    answer_tokens: int = 300,
    jitter: float = 0.0,
    workers: int = 1,
    warmup: int = 8,
    request_timeout: float = 120.0,
    arrival_rate: float = 0.0,
    upstream_extra: dict[str, Any] | None = None,
) -> LoadReport:
    """`n_requests` concurrent streamed requests straight to a local test upstream, then as many through
    `sot serve` (in `mode`, with `workers` worker processes) in front of it: all sent at once, or arriving
    as a Poisson process of `arrival_rate` requests per second (the same seeded schedule on both sides).
    `upstream_extra`: more test upstream options (faults, for tests).

    It starts its own processes (the bundled test upstream, and `sot serve` in front of it, on 127.0.0.1) and
    stops them; the upstream's answers are scripted and timed, so it measures the server, not a model. Both
    sides use the same raw HTTP client (`load_client`: one connection per request, the arrival of the headers
    and of each SSE event) and the same concurrency; the direct batch runs first, then the one through the
    server, after a warm-up of each path. CPU times come from /proc/PID/stat before and after each batch.

    The upstream's full ("normal") answer is exactly `answer_tokens` tokens (without jitter), a point
    `answer_tokens / 5` (see `upstream_options`), so a SoT answer has as many tokens plus its point labels.
    """
    if n_requests < 1:
        raise ValueError("n_requests must be at least 1")
    options = upstream_options(answer_tokens, ttft, tokens_per_second, jitter, **(upstream_extra or {}))
    settings: dict[str, Any] = {
        "n_requests": n_requests,
        "mode": mode,
        "ttft": ttft,
        "tokens_per_second": tokens_per_second,
        "answer_tokens": answer_tokens,
        "jitter": jitter,
        "workers": workers,
        "warmup": min(warmup, n_requests),
        "max_tokens": answer_tokens * 4,  # never the limit: every answer ends with "stop"
        "request_timeout": request_timeout,
        "arrival_rate": arrival_rate,  # 0: a burst, all at once
        "order": "direct first, then through the server",
    }
    direct, via = await _both_sides(options, settings)
    settings.pop("upstream_root", None)
    return LoadReport(settings=settings, upstream=options, direct=direct, server=via)


async def _both_sides(options: dict[str, Any], settings: dict[str, Any]) -> tuple[Side, Side]:
    """Start the upstream and the server, warm both paths, measure direct then through the server, stop both."""
    n_requests, mode = settings["n_requests"], settings["mode"]
    upstream = ServiceProcess(upstream_command(**options), name="load-upstream").launch()
    server: ServiceProcess | None = None
    try:
        server = await _start(upstream, n_requests, settings)
        pids = {"upstream": process_id(upstream), "server": process_id(server)}
        direct_url, server_url = upstream.root_url + "/v1", server.root_url + "/v1"
        # Warm both paths (connections to the upstream, first-request imports): the batches measure steady state.
        if settings["warmup"]:
            await _measure("warm-up", direct_url, "test", settings["warmup"], settings, {})
            await _measure("warm-up", server_url, f"{mode}:test", settings["warmup"], settings, {})
        direct = await _measure("direct", direct_url, "test", n_requests, settings, {"upstream": pids["upstream"]})
        via = await _measure("via sot serve", server_url, f"{mode}:test", n_requests, settings, pids)
    finally:
        if server is not None:
            server.terminate()
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(upstream.stop)
    return direct, via
