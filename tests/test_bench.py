"""Benchmark arithmetic on hand-computed examples, and `sot bench` end to end against the test upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sot.bench.latency import QuestionTiming, geometric_mean, measure_question, summarize
from sot.eval.equal_length import Timeline
from sot.events import PointStats, Result, Stats
from test_datasets import VICUNA_ROWS, seed_cache, synthetic_sources

ROOT = Path(__file__).resolve().parents[1]


def result(mode: str, stats: Stats, finish: str = "stop") -> Result:
    return Result(
        mode_requested=mode,  # type: ignore[arg-type]
        mode_used=mode,  # type: ignore[arg-type]
        answer="x",
        complete=finish == "stop",
        finish_reason=finish,  # type: ignore[arg-type]
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
    }
    defaults.update(fields)
    return QuestionTiming(normal_seconds=normal, sot_seconds=sot, **defaults)  # type: ignore[arg-type]


def test_one_question_measured() -> None:
    # Normal: 4 chunks at 0.5 s intervals, done at 2.1 s. SoT: 3 tokens in 0.5 s (skeleton 0.2 s, point 0.3 s).
    normal = result("normal", Stats(token_times=[0.5, 1.0, 1.5, 2.0], total_seconds=2.1, completion_tokens=4))
    points = [PointStats(index=1, point="a", start=0.2, seconds=0.3, tokens=2, finish_reason="stop", attempts=1)]
    sot = result("sot", Stats(skeleton_seconds=0.2, points=points, total_seconds=0.5, completion_tokens=3))
    row = measure_question(normal, sot, {"id": "q1", "category": "c"}, repeat=1, normal_first=False)
    assert row.speedup == pytest.approx(4.2)
    assert row.normal_seconds_at_sot_length == 1.5  # normal's third token
    assert row.equal_length_speedup == pytest.approx(3.0)
    assert row.parallel_efficiency == pytest.approx(1.0)
    assert (row.repeat, row.normal_first) == (1, False)
    data = row.to_json()
    assert data["equal_length_speedup"] == pytest.approx(3.0)
    assert data["normal_timeline"]["times"] == (0.5, 1.0, 1.5, 2.0)
    # SoT wrote more than normal did: no equal-length figure (never extrapolated).
    longer = result("sot", Stats(skeleton_seconds=0.2, points=points, total_seconds=0.5, completion_tokens=9))
    assert measure_question(normal, longer, {"id": "q1"}).equal_length_speedup is None


def test_ratios_of_one_question() -> None:
    row = timing(3.0, 1.5, normal_timeline=Timeline.of([0.4, 0.8, 1.2], total_seconds=1.3), sot_tokens=2)
    assert row.speedup == 2.0
    assert row.parallel_efficiency == pytest.approx(1.0)  # 0.5 s skeleton + 1.0 s slowest point = 1.5 s
    assert row.equal_length_speedup == pytest.approx(0.8 / 1.5)  # normal made SoT's 2 tokens in 0.8 s
    assert timing(3.0, 1.5, sot_fallback="no points").parallel_efficiency is None
    assert timing(3.0, 1.5).equal_length_speedup is None  # no timeline


def test_summary_separates_capped_answers() -> None:
    rows = [
        timing(4.0, 1.0, id="a"),
        timing(1.0, 1.0, id="b"),
        timing(8.0, 1.0, id="c", normal_capped=True),  # a looping normal answer: not a finished answer
    ]
    summary = summarize(rows)
    assert summary.speedup_geomean == pytest.approx(geometric_mean([4.0, 1.0, 8.0]))
    assert summary.speedup_geomean == pytest.approx(32 ** (1 / 3))
    assert summary.speedup_median == 4.0
    assert summary.finished_questions == 2
    assert summary.finished_speedup_geomean == pytest.approx(2.0)
    assert summary.normal_capped == 1 and summary.sot_capped == 0
    assert summary.equal_length_compared == 0 and summary.equal_length_too_short == 3


def test_repeats_and_intervals() -> None:
    line = Timeline.of([0.1 * i for i in range(1, 101)], total_seconds=10.1)
    rows = [
        timing(normal, sot, id=qid, repeat=repeat, normal_timeline=line, sot_tokens=50)
        for repeat in (0, 1)
        for qid, normal, sot in (("a", 4.0, 2.0), ("b", 3.0, 1.0), ("c", 6.0, 2.0), ("d", 2.0, 2.0))
    ]
    summary = summarize(rows)
    assert (summary.questions, summary.runs, summary.repeats) == (4, 8, 2)
    interval = summary.interval("speedup_geomean")
    assert interval is not None and interval.estimate == pytest.approx(summary.speedup_geomean)
    assert interval.low <= summary.speedup_geomean <= interval.high
    assert 1.0 <= interval.low < interval.high <= 3.0 + 1e-9  # within the four questions' speed-ups
    assert summarize(rows).intervals == summary.intervals  # seeded: the same rows, the same interval
    assert summary.equal_length_compared == 8
    data = summary.to_json()
    assert set(data["intervals"]) >= {"speedup_geomean", "finished_speedup_geomean", "equal_length_speedup_geomean"}
    assert data["intervals"]["speedup_geomean"]["level"] == 0.95 and data["bootstrap"]["seed"] == 0


def run_sot(args: list[str], tmp_path: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`sot ARGS` in `tmp_path`, with this tree's package, no dataset or backend settings but `env`'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SOT_DATASETS", "SOT_BACKEND"))}
    return subprocess.run(
        [sys.executable, "-m", "sot", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tmp_path,
        env={**clean, "COLUMNS": "200", "PYTHONPATH": str(ROOT / "src"), **env},
    )


def bench(args: list[str], tmp_path: Path, env: dict[str, str]) -> tuple[dict, str]:
    output = tmp_path / "bench.json"
    done = run_sot(["bench", *args, "--output", str(output)], tmp_path, env)
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(output.read_text()), done.stdout


def test_sot_bench_on_the_named_dataset_from_the_cache(tmp_path: Path) -> None:
    """A fresh directory, no ../shared: `--dataset vicuna80` reads a cache filled as a download would have."""
    cache = tmp_path / "xdg" / "sot" / "datasets"
    env = seed_cache(cache, synthetic_sources())
    env |= {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "SOT_DATASETS_SOT_URL": "http://127.0.0.1:9/"}
    env |= {"SOT_DATASETS_FASTCHAT_URL": "http://127.0.0.1:9/"}  # nothing listens there: no download
    pacing = ["--upstream-ttft", "0.1", "--upstream-tokens-per-second", "200"]
    payload, stdout = bench(["--dataset", "vicuna80", "--repeat", "2", *pacing], tmp_path, env)
    suitable = [f"vicuna-{n:02d}" for n, _, _, ok in VICUNA_ROWS if ok]
    assert [row["id"] for row in payload["rows"]] == suitable * 2
    assert [row["normal_first"] for row in payload["rows"]] == [True, False, False, True]
    for row in payload["rows"]:
        assert row["points"] == 5 and row["sot_fallback"] is None
        assert row["parallel_efficiency"] > 0.9
    summary = payload["summary"]
    assert summary["parallel_efficiency_median"] >= 0.95 and summary["runs"] == 4
    low, high = summary["intervals"]["speedup_geomean"]["low"], summary["intervals"]["speedup_geomean"]["high"]
    assert low <= summary["speedup_geomean"] <= high
    assert payload["settings"]["dataset"] == "vicuna80" and payload["settings"]["repeats"] == 2
    assert "parallel efficiency, median" in stdout and "bootstrap interval" in stdout
    # The test upstream's constant lengths: its normal answers are shorter than SoT's, so not compared.
    assert summary["equal_length_too_short"] == 4 and summary["equal_length_speedup_geomean"] is None


def test_sot_bench_without_the_dataset_says_what_to_do(tmp_path: Path) -> None:
    env = {"SOT_DATASETS_DIR": str(tmp_path / "none"), "SOT_DATASETS_SOT_URL": "http://127.0.0.1:9/"}
    done = run_sot(["bench", "--dataset", "lima"], tmp_path, env, timeout=60)
    assert done.returncode == 1
    assert "dataset 'lima' is not cached and could not be downloaded" in done.stderr + done.stdout
