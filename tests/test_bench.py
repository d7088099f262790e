"""Benchmark arithmetic on hand-computed examples, and `sot bench` end to end against the test upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sot.bench.latency import QuestionTiming, geometric_mean, summarize, time_at_token
from sot.events import Result, Stats

SHARED = Path(__file__).resolve().parents[2] / "shared"


def normal_result(token_times: list[float], total: float, tokens: int) -> Result:
    stats = Stats(token_times=token_times, total_seconds=total, completion_tokens=tokens)
    return Result(
        mode_requested="normal",
        mode_used="normal",
        answer="x",
        complete=True,
        finish_reason="stop",
        backend="b",
        model="m",
        stats=stats,
    )


def timing(normal: float, sot: float, **fields: object) -> QuestionTiming:
    defaults: dict[str, object] = {
        "id": "q",
        "category": "c",
        "normal_tokens": 100,
        "sot_tokens": 50,
        "normal_capped": False,
        "sot_capped": False,
        "sot_fallback": None,
        "skeleton_seconds": 0.5,
        "slowest_point_seconds": 1.0,
        "points": 4,
        "normal_seconds_at_sot_length": None,
    }
    defaults.update(fields)
    return QuestionTiming(normal_seconds=normal, sot_seconds=sot, **defaults)  # type: ignore[arg-type]


def test_time_at_token_reads_the_timestamps_and_extrapolates_past_the_end() -> None:
    result = normal_result([0.1, 0.2, 0.3, 0.4], total=0.5, tokens=4)
    assert time_at_token(result, 2) == 0.2
    assert time_at_token(result, 4) == 0.5  # the whole answer: its total time
    assert time_at_token(result, 8) == 1.0  # twice as long as normal's answer: linear from its rate
    assert time_at_token(normal_result([], 0.0, 0), 3) is None


def test_ratios_of_one_question() -> None:
    row = timing(3.0, 1.5, normal_seconds_at_sot_length=1.2)
    assert row.speedup == 2.0
    assert row.parallel_efficiency == pytest.approx(1.0)  # 0.5 s skeleton + 1.0 s slowest point = 1.5 s
    assert row.equal_length_speedup == pytest.approx(0.8)  # normal made SoT's 50 tokens in 1.2 s
    assert timing(3.0, 1.5, sot_fallback="no points").parallel_efficiency is None


def test_summary_separates_capped_answers() -> None:
    rows = [
        timing(4.0, 1.0),
        timing(1.0, 1.0),
        timing(8.0, 1.0, normal_capped=True),  # a looping normal answer: not a finished answer
    ]
    summary = summarize(rows)
    assert summary.speedup_geomean == pytest.approx(geometric_mean([4.0, 1.0, 8.0]))
    assert summary.speedup_geomean == pytest.approx(32 ** (1 / 3))
    assert summary.speedup_median == 4.0
    assert summary.finished_questions == 2
    assert summary.finished_speedup_geomean == pytest.approx(2.0)
    assert summary.normal_capped == 1 and summary.sot_capped == 0


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not present")
def test_sot_bench_against_the_test_upstream(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "sot", "bench", "--limit", "3", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr + done.stdout
    payload = json.loads(output.read_text())
    assert len(payload["rows"]) == 3
    for row in payload["rows"]:
        assert row["points"] == 5 and row["sot_fallback"] is None
        assert row["parallel_efficiency"] > 0.9
    assert payload["summary"]["parallel_efficiency_median"] >= 0.95
    assert "parallel efficiency, median" in done.stdout
