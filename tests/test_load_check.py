"""The `sot bench` load check at a small scale: it starts the test upstream and `sot serve` itself, sends
concurrent streamed requests both straight and through the server, and reports failures and the latency ratio."""

from __future__ import annotations

import math

from rich.console import Console

from sot.bench.load import LoadReport, render_load_report, run_load_check


async def test_load_check_runs_end_to_end_at_small_scale() -> None:
    report = await run_load_check(12, ttft=0.05, tokens_per_second=200, answer_tokens=10, warmup=2)
    assert isinstance(report, LoadReport)
    assert report.ok and report.failed == 0 and report.failures == []
    assert report.direct.count == report.via_server.count == 12
    assert report.upstream_requests == 12  # normal mode: each request goes upstream exactly once
    # Every answer takes at least the upstream's own time (first token, then 9 more at 200/s).
    assert report.direct.p50 >= 0.05 + 9 / 200 * 0.9
    assert math.isfinite(report.ratio) and report.ratio > 0.5

    console = Console(record=True, width=120)
    console.print(render_load_report(report))
    text = console.export_text()
    assert "PASS" in text and "latency ratio" in text and "via sot serve" in text


async def test_load_check_in_sot_mode_fans_out_upstream() -> None:
    report = await run_load_check(4, mode="sot", ttft=0.02, tokens_per_second=500, answer_tokens=8, warmup=1)
    assert report.ok
    assert report.upstream_requests == 4 * 6  # a skeleton and five points per question
