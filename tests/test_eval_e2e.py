"""`sot eval run | judge | report` end to end with the embedded model, offline; the report is recomputed here."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sot.cli.eval_cmd import eval_group
from sot.eval.judge import parse_scores

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VICUNA = SHARED / "data" / "vicuna80.jsonl"
if not VICUNA.is_file():
    pytest.skip(f"{VICUNA} is not present: the end-to-end run on Vicuna questions cannot run", allow_module_level=True)
# One question from each of three categories: a list-like one, a role-play one and a coding one.
SUBSET = "vicuna-01,vicuna-02,vicuna-21,vicuna-61"


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def verdict_of(first_reply: str, second_reply: str) -> str:
    """The pair verdict recomputed from the raw replies, without the package's metric helpers."""
    a, b = parse_scores(first_reply), parse_scores(second_reply)
    if a is None or b is None:
        return "unparsable"
    first = "win" if a[0] > a[1] else "lose" if a[0] < a[1] else "tie"  # the candidate was Assistant 1
    second = "win" if b[1] > b[0] else "lose" if b[1] < b[0] else "tie"  # the candidate was Assistant 2
    return first if first == second else "tie"


def test_run_judge_report_with_the_embedded_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOT_BACKEND", raising=False)
    runner = CliRunner()
    results = tmp_path / "subset.results.jsonl"
    judgements = tmp_path / "subset.judgements.jsonl"
    report = tmp_path / "report"

    run = ["run", str(VICUNA), "--ids", SUBSET, "--modes", "normal,sot", "-o", str(results), "--backend", "local"]
    outcome = runner.invoke(eval_group, [*run, "--max-tokens", "160"])
    assert outcome.exit_code == 0, outcome.output
    answers = rows(results)
    assert len(answers) == 8 and all(r["error"] is None for r in answers)
    assert {r["result"]["backend"] for r in answers} == {"local"}
    # Resuming finds everything done and runs nothing.
    outcome = runner.invoke(eval_group, [*run, "--max-tokens", "160"])
    assert outcome.exit_code == 0 and "resuming: 8 of 8" in outcome.output
    assert len(rows(results)) == 8

    outcome = runner.invoke(eval_group, ["judge", str(results), "-o", str(judgements), "--backend", "local"])
    assert outcome.exit_code == 0, outcome.output
    verdicts = rows(judgements)
    assert len(verdicts) == 4 and all(v["error"] is None for v in verdicts)

    outcome = runner.invoke(eval_group, ["report", str(results), "--judgements", str(judgements), "-o", str(report)])
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads((report / "summary.json").read_text())
    markdown = (report / "report.md").read_text()
    for chart in ("speedup_by_category.png", "latency_distribution.png", "win_tie_lose.png", "net_win_rate.png"):
        assert (report / chart).read_bytes()[:4] == b"\x89PNG"
        assert f"({chart})" in markdown

    # -- the speed-ups, recomputed from the results file --
    by_key = {(r["question_id"], r["mode"]): r for r in answers}
    ratios: dict[str, list[float]] = {}
    for (qid, mode), record in by_key.items():
        if mode != "sot":
            continue
        normal = by_key[(qid, "normal")]["result"]["stats"]["total_seconds"]
        sot = record["result"]["stats"]["total_seconds"]
        ratios.setdefault(record["category"], []).append(normal / sot)
    every = [v for values in ratios.values() for v in values]
    speed = summary["speedup"]["sot"]
    assert speed["overall"]["n"] == 4
    assert speed["overall"]["median"] == pytest.approx(statistics.median(every))
    assert speed["overall"]["geomean"] == pytest.approx(geomean(every))
    for category, values in ratios.items():
        assert speed["by_category"][category]["geomean"] == pytest.approx(geomean(values))
        assert speed["by_category"][category]["median"] == pytest.approx(statistics.median(values))
    assert f"geometric mean ×{geomean(every):.2f}" in markdown

    # -- the verdicts and net win rates, recomputed from the judgements' raw replies --
    counts = {"win": 0, "tie": 0, "lose": 0, "unparsable": 0}
    for v in verdicts:
        assert [o["order"] for o in v["orders"]] == ["candidate_first", "baseline_first"]
        recomputed = verdict_of(v["orders"][0]["reply"], v["orders"][1]["reply"])
        assert v["verdict"] == recomputed
        counts[recomputed] += 1
    overall = summary["quality"]["overall"]["sot"]["overall"]
    assert {k: overall[k] for k in counts} == counts
    judged = counts["win"] + counts["tie"] + counts["lose"]
    if judged:
        assert overall["net_win_rate"] == pytest.approx((counts["win"] - counts["lose"]) / judged)
    else:
        assert overall["net_win_rate"] is None

    # -- latency and token counts, recomputed --
    sot_tokens = [r["result"]["stats"]["completion_tokens"] for r in answers if r["mode"] == "sot"]
    assert summary["completion_tokens"]["sot"]["overall"]["mean"] == pytest.approx(statistics.fmean(sot_tokens))
    normal_seconds = [r["result"]["stats"]["total_seconds"] for r in answers if r["mode"] == "normal"]
    assert summary["latency_seconds"]["normal"]["overall"]["median"] == pytest.approx(statistics.median(normal_seconds))
