"""`sot bench --load` at a small scale: SSE parsing, targets, both sides from real processes, failures, JSON."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from sot.bench.load import run_load_check
from sot.bench.load_client import Batch, SSEStream, StreamTrace, arrival_offsets
from sot.bench.load_repeat import RepeatedLoad, render_repeated
from sot.bench.load_report import LoadReport, Side, render_load_report
from sot.cli.bench import bench

FAST = {"ttft": 0.05, "tokens_per_second": 200.0, "answer_tokens": 20, "warmup": 2}


def _text(report: LoadReport | RepeatedLoad) -> str:
    console = Console(record=True, width=160)
    console.print(render_load_report(report) if isinstance(report, LoadReport) else render_repeated(report))
    return console.export_text()


def _chunk(content: str, finish: str | None = None) -> bytes:
    delta = json.dumps({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})
    return f"data: {delta}\r\n\r\n".encode()


async def _parse(response: bytes, step: int) -> StreamTrace:
    """Feed a raw HTTP response to the client's parser `step` bytes at a time."""
    stream = SSEStream(b"", 0.0)
    for i in range(0, len(response), step):
        stream.data_received(response[i : i + step])
    stream.connection_lost(None)
    return await asyncio.wait_for(stream.finished, 1)


@pytest.mark.parametrize("step", [1, 7, 10_000])
async def test_client_times_events_and_counts_tokens_per_event_across_any_split(step: int) -> None:
    events = _chunk("") + _chunk("One ") + _chunk("two three ") + b": ping\n\n" + _chunk("four", "stop")
    events += b"data: [DONE]\n\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (events[:50], events[50:])) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    trace = await _parse(head + body, step)
    assert trace.failure() is None
    assert (trace.content_events, trace.tokens, trace.max_tokens_per_event) == (3, 4, 2)
    assert trace.finish_reason == "stop" and trace.done
    assert trace.headers is not None and trace.first_content is not None and trace.total is not None


async def test_client_fails_streams_without_done_and_error_statuses() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    cut = _chunk("One ", "stop")
    trace = await _parse(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(cut), cut), 5)
    assert trace.failure() == "the stream ended without data: [DONE]"
    error = b'{"error":{"message":"busy"}}'
    trace = await _parse(b"HTTP/1.1 429 Too Many\r\ncontent-length: %d\r\n\r\n%s" % (len(error), error), 9)
    assert trace.failure() is not None and trace.failure().startswith("HTTP 429: ")  # type: ignore[union-attr]
    trace = await _parse(head + b"5\r\nda", 3)  # the connection closes mid-body
    assert "connection closed" in (trace.failure() or "")


def _side(label: str, p50: float, headers_ms: float, first_ms: float, max_per_event: int) -> Side:
    ok = StreamTrace(200, headers_ms / 1000, first_ms / 1000, p50, 10, 10, max_per_event, "stop", True)
    return Side.of(label, Batch([ok, ok], p50))


def test_targets_judge_ratios_and_only_failures_count_in_sot_mode() -> None:
    settings = {"n_requests": 200, "mode": "normal", "ttft": 0.5, "tokens_per_second": 40.0, "answer_tokens": 300}
    report = LoadReport(settings, {}, _side("direct", 8.0, 2, 500, 1), _side("server", 8.8, 60, 550, 1))
    report.server.headers_after_accept_p50_ms = 70.0
    verdicts = {t.name: t.passed for t in report.targets()}
    assert verdicts == {
        "failed requests": True,
        "latency ratio p50 (server / direct)": False,  # 1.10
        "latency ratio p95 (server / direct)": False,
        "first content added, p50": True,  # 50 ms
        "headers after the upstream accepted, p50": False,  # 70 ms
        "tokens per SSE event, max": True,
    }
    assert report.off_reference() == []
    report.settings = {**settings, "mode": "sot", "n_requests": 20}
    assert [t.passed for t in report.targets()] == [True, None, None, None, None, None]
    assert report.off_reference() == ["n_requests 20 (targets: 200)"]


REFERENCE_SETTINGS = {"n_requests": 200, "mode": "normal", "ttft": 0.5, "tokens_per_second": 40.0, "answer_tokens": 300}


def _run(added_first_content_ms: float, ratio: float = 1.01, failed: int = 0, mode: str = "normal") -> LoadReport:
    server = _side("server", 8.0 * ratio, 60, 500 + added_first_content_ms, 1)
    server.failed = failed
    report = LoadReport({**REFERENCE_SETTINGS, "mode": mode}, {}, _side("direct", 8.0, 2, 500, 1), server)
    server.headers_after_accept_p50_ms = 20.0
    return report


def test_repeated_runs_judge_a_figure_on_the_interval_of_its_median_and_failures_on_every_run() -> None:
    steady = RepeatedLoad([_run(ms) for ms in (40, 45, 50, 55, 60, 65, 70, 75)])
    targets = {t.name: t for t in steady.targets()}
    first = targets["first content added, p50"]
    assert first.values == [40, 45, 50, 55, 60, 65, 70, 75] and first.within == 8
    assert first.interval is not None and 40 <= first.interval.low <= 57.5 <= first.interval.high <= 75
    assert all(t.passed for t in steady.targets()) and steady.ok

    # One run over the limit does not fail a target whose median is surely within it, and is shown as such...
    one_slow = RepeatedLoad([_run(ms) for ms in (40, 45, 50, 55, 60, 65, 70, 130)])
    slow = {t.name: t for t in one_slow.targets()}["first content added, p50"]
    assert slow.passed is True and slow.within == 7
    # ... while a median near the limit fails: its interval reaches past it, though most runs are within.
    borderline = RepeatedLoad([_run(ms) for ms in (80, 90, 95, 98, 99, 104, 110, 120)])
    near = {t.name: t for t in borderline.targets()}["first content added, p50"]
    assert near.passed is False and near.within == 5
    # A failed request in any run fails the run set, whatever the median says.
    failing = RepeatedLoad([_run(50), _run(50, failed=1), _run(50)])
    verdicts = {t.name: t.passed for t in failing.targets()}
    assert verdicts["failed requests"] is False and verdicts["first content added, p50"] is True
    assert not failing.ok and failing.failed == 1

    text = _text(one_slow)
    assert "targets over 8 runs" in text and "7/8" in text and "40-130 ms" in text and "PASS" in text
    assert "FAIL" in _text(borderline) and "targets are set for other settings" not in text
    off = RepeatedLoad([_run(50)])
    off.reports[0].settings["arrival_rate"] = 100.0
    assert "targets are set for other settings: arrival_rate 100 (targets: 0)" in _text(off)
    payload = json.loads(json.dumps(one_slow.to_json()))
    assert len(payload["runs"]) == 8 and payload["failed"] == 0
    first_json = next(t for t in payload["targets"] if t["name"] == "first content added, p50")
    assert first_json["within_limit"] == 7 and first_json["median"]["estimate"] == 57.5 and first_json["passed"]


def test_repeated_runs_in_sot_mode_judge_only_failures() -> None:
    repeated = RepeatedLoad([_run(900, ratio=0.5, mode="sot") for _ in range(3)])
    assert [t.passed for t in repeated.targets()] == [True, None, None, None, None, None]
    assert "n/a (SoT)" in _text(repeated)
    with pytest.raises(ValueError, match="at least one run"):
        RepeatedLoad([])


async def test_load_check_reports_both_sides_of_one_run() -> None:
    report = await run_load_check(20, **FAST)  # type: ignore[arg-type]
    assert report.ok and report.failed == 0
    for side in (report.direct, report.server):
        assert (side.requests, side.failed, side.failures) == (20, 0, [])
        assert side.upstream_requests == 20  # normal mode: each request goes upstream exactly once
        assert side.tokens == side.upstream_tokens == 20 * 20  # every full answer is exactly 20 tokens
        assert 1 <= side.tokens_per_event_mean <= side.tokens_per_event_max
        assert 0 < side.headers_p50_ms <= side.first_content_p50_ms <= side.total_p50 * 1000
        # Every answer takes at least the upstream's own time (first token, then 19 more at 200/s).
        assert side.total_p50 >= 0.05 + 19 / 200 * 0.9
    # Through the server, its headers are matched to the upstream's acceptance of the same question: after it,
    # and (20 requests on an idle machine) well within the time to first content.
    after_accept = report.server.headers_after_accept_p50_ms
    assert after_accept is not None and 0 < after_accept < report.server.first_content_p50_ms
    assert report.direct.headers_after_accept_p50_ms is None
    assert report.direct.content_events == 400 and report.direct.tokens_per_event_max == 1
    assert set(report.direct.cpu) == {"upstream", "client"}
    assert set(report.server.cpu) == {"upstream", "server", "client"} and report.server.cpu["server"] > 0
    assert report.server.cpu_per_1k("server") is not None
    assert report.latency_ratio_p50 > 0.9 and report.targets()[0].passed is True

    text = _text(report)
    for needed in ("via server", "latency p50 s", "headers p50 ms", "server CPU s / 1k tokens", "targets", "PASS"):
        assert needed in text
    assert "targets are set for other settings" in text
    payload = json.loads(json.dumps(report.to_json()))
    assert payload["failed"] == 0 and len(payload["targets"]) == 6 and payload["settings"]["mode"] == "normal"


def test_arrivals_are_a_seeded_poisson_process_or_a_burst() -> None:
    offsets = arrival_offsets(4000, 100.0)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and all(gap >= 0 for gap in gaps)
    assert 0.0095 < sum(gaps) / len(gaps) < 0.0105  # exponential gaps of mean 1/rate
    share_short = sum(gap < 0.01 for gap in gaps) / len(gaps)
    assert 0.60 < share_short < 0.66  # P(gap < mean) = 1 - 1/e for an exponential, not 0.5 as for even gaps
    assert offsets == arrival_offsets(4000, 100.0) and offsets != arrival_offsets(4000, 100.0, seed=1)
    assert arrival_offsets(5, 0.0) == [0.0] * 5


async def test_load_check_with_poisson_arrivals_spreads_the_requests_on_both_sides() -> None:
    report = await run_load_check(10, arrival_rate=40.0, **FAST)  # type: ignore[arg-type]
    assert report.ok and report.settings["arrival_rate"] == 40.0
    last_sent = arrival_offsets(10, 40.0)[-1]
    assert last_sent > 0.1
    for side in (report.direct, report.server):
        # The batch lasts at least until the last request was sent and answered (20 tokens at 200/s).
        assert side.wall >= last_sent + 0.05 + 19 / 200 * 0.9
    assert "arrival_rate 40 (targets: 0)" in report.off_reference()
    assert "arriving at 40/s (Poisson)" in _text(report)


async def test_load_check_counts_failures_of_a_faulty_upstream() -> None:
    fault = {"fault": "error-mid-stream", "fault_rate": 0.3}
    report = await run_load_check(20, upstream_extra=fault, **FAST)  # type: ignore[arg-type]
    assert report.direct.failed > 0 and report.server.failed > 0
    assert not report.ok and report.failed == report.direct.failed + report.server.failed
    assert report.direct.requests == report.server.requests == 20
    assert all(f.startswith("error event") for f in report.direct.failures + report.server.failures)
    assert report.targets()[0].passed is False
    text = _text(report)
    assert "FAIL" in text and "error event" in text


async def test_load_check_in_sot_mode_fans_out_upstream() -> None:
    report = await run_load_check(6, mode="sot", **FAST)  # type: ignore[arg-type]
    assert report.ok
    assert report.server.upstream_requests == 6 * 6  # a skeleton and five points per question
    assert report.server.tokens > report.direct.tokens  # the points' text plus their labels


def test_command_writes_the_report_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--load", "8", "--load-ttft", "0.05", "--load-tokens-per-second", "200", "--load-answer-tokens", "20"]
    result = CliRunner().invoke(bench, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "targets" in result.output and "via server" in result.output
    payload = json.loads(out.read_text())
    assert payload["settings"]["n_requests"] == 8 and payload["server"]["requests"] == 8


def test_command_repeats_the_load_check_and_writes_every_run(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--load", "6", "--load-ttft", "0.05", "--load-tokens-per-second", "200", "--load-answer-tokens", "10"]
    result = CliRunner().invoke(bench, [*args, "--repeat", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "run 1: failed 0" in result.output and "run 2: failed 0" in result.output
    assert "targets over 2 runs" in result.output
    payload = json.loads(out.read_text())
    assert [run["server"]["requests"] for run in payload["runs"]] == [6, 6]
    failed = next(t for t in payload["targets"] if t["name"] == "failed requests")
    assert failed == {**failed, "values": [0, 0], "within_limit": 2, "passed": True, "judged_on": "every run"}
