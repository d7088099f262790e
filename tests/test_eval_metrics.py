"""The evaluation's arithmetic against hand-computed examples: speed-ups, verdicts, net win rates, routing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sot.eval.judge import parse_scores
from sot.eval.metrics import (
    Distribution,
    RouterCounts,
    VerdictCounts,
    by_category,
    combine_orders,
    geometric_mean,
    order_verdict,
    percentile,
    speedup,
    verdicts_by_category,
)
from sot.eval.records import AnswerRecord, JudgementRecord, OrderJudgement, load_records, write_records
from sot.eval.report import summarize
from sot.events import Result, RouteDecided, Stats

# -- speed-up ------------------------------------------------------------------------------------------


def test_speedup_is_normal_over_candidate() -> None:
    assert speedup(6.0, 2.0) == 3.0
    assert speedup(2.0, 4.0) == 0.5
    with pytest.raises(ValueError):
        speedup(1.0, 0.0)


def test_geometric_mean_and_median_by_hand() -> None:
    # Ratios 3, 1 and 0.5: median 1; geometric mean = (3 * 1 * 0.5) ** (1/3) = 1.5 ** (1/3) = 1.1447...
    ratios = [speedup(6, 2), speedup(4, 4), speedup(3, 6)]
    assert ratios == [3.0, 1.0, 0.5]
    d = Distribution.of(ratios)
    assert d.n == 3 and d.median == 1.0 and d.min == 0.5 and d.max == 3.0
    assert d.geomean == pytest.approx(1.5 ** (1 / 3))
    assert d.mean == pytest.approx(1.5)
    # x2 and x0.5 cancel in a geometric mean, not in an arithmetic one.
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert geometric_mean([]) is None
    assert Distribution.of([]).median is None


def test_even_count_median_and_percentile() -> None:
    d = Distribution.of([4.0, 1.0, 2.0, 3.0])
    assert d.median == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)  # 3 + 0.7 * (4 - 3)


def test_by_category_groups_and_overall() -> None:
    rows = [("coding", 2.0), ("coding", 8.0), ("writing", 0.5)]
    table, overall = by_category(rows)
    assert list(table) == ["coding", "writing"]
    assert table["coding"].geomean == pytest.approx(4.0)  # sqrt(2 * 8)
    assert table["coding"].median == 5.0
    assert table["writing"].geomean == 0.5
    assert overall.n == 3
    assert overall.geomean == pytest.approx((2 * 8 * 0.5) ** (1 / 3))  # 8 ** (1/3) = 2
    assert overall.geomean == pytest.approx(2.0)


# -- verdicts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "candidate_first", "expected"),
    [
        ((8, 6), True, "win"),
        ((8, 6), False, "lose"),  # the candidate was Assistant 2 and got 6
        ((6, 8), False, "win"),
        ((7, 7), True, "tie"),
        ((7.5, 7), True, "win"),
        (None, True, "unparsable"),
    ],
)
def test_order_verdict(scores: tuple[float, float] | None, candidate_first: bool, expected: str) -> None:
    assert order_verdict(scores, candidate_first=candidate_first) == expected


@pytest.mark.parametrize(
    ("first", "second", "combined"),
    [
        ("win", "win", "win"),
        ("lose", "lose", "lose"),
        ("tie", "tie", "tie"),
        ("win", "tie", "tie"),
        ("tie", "win", "tie"),
        ("lose", "tie", "tie"),
        ("win", "lose", "tie"),  # position bias: each order favoured whichever answer came first
        ("lose", "win", "tie"),
        ("win", "unparsable", "unparsable"),
        ("unparsable", "tie", "unparsable"),
        ("unparsable", "unparsable", "unparsable"),
    ],
)
def test_combine_orders(first: str, second: str, combined: str) -> None:
    assert combine_orders(first, second) == combined  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "position", "expected"),
    [
        ("8 6", "first_line", (8.0, 6.0)),
        ("8 6\nAssistant 1 gave more detail.", "first_line", (8.0, 6.0)),
        ("\n  7.5 9  \nbecause", "first_line", (7.5, 9.0)),
        ("8, 6", "first_line", (8.0, 6.0)),
        ("**8 6**", "first_line", (8.0, 6.0)),
        ("(8, 6)", "first_line", (8.0, 6.0)),
        ("10 1", "first_line", (10.0, 1.0)),
        ("Assistant 1: 8\nAssistant 2: 6", "first_line", None),  # labels: not the asked format, not guessed
        ("8/10 6/10", "first_line", None),
        ("8", "first_line", None),
        ("8 6 7", "first_line", None),
        ("11 6", "first_line", None),  # off the 1-10 scale
        ("Both answers are good.", "first_line", None),
        ("", "first_line", None),
        ("First I solve it: 2 + 2 = 4 ... Scores: (3, 9)", "end", (3.0, 9.0)),
        ("(1, 2) was wrong; final: (9, 4)", "end", (9.0, 4.0)),
        ("9 4\nno tuple here", "end", (9.0, 4.0)),
        ("no scores at all", "end", None),
    ],
)
def test_parse_scores(reply: str, position: str, expected: tuple[float, float] | None) -> None:
    assert parse_scores(reply, position) == expected  # type: ignore[arg-type]


def test_net_win_rate_by_hand_with_ties_disagreements_and_unparsable() -> None:
    # Judge replies for seven pairs, (candidate first, baseline first):
    replies = {
        "q1": ("8 6", "6 8"),  # SoT better in both orders -> win
        "q2": ("7 7", "7 7"),  # tie
        "q3": ("5 9", "9 5"),  # normal better in both orders -> lose
        "q4": ("9 5", "9 5"),  # whichever came first won: orders disagree -> tie
        "q5": ("8 6", "7 7"),  # win + tie -> tie
        "q6": ("Assistant 1 is better", "6 8"),  # one order unparsable -> unparsable
        "q7": ("10 2", "2 10"),  # win
    }
    verdicts = {}
    for qid, (first, second) in replies.items():
        a = order_verdict(parse_scores(first), candidate_first=True)
        b = order_verdict(parse_scores(second), candidate_first=False)
        verdicts[qid] = combine_orders(a, b)
    assert verdicts == {
        "q1": "win",
        "q2": "tie",
        "q3": "lose",
        "q4": "tie",
        "q5": "tie",
        "q6": "unparsable",
        "q7": "win",
    }
    counts = VerdictCounts.of(verdicts.values())
    assert (counts.win, counts.tie, counts.lose, counts.unparsable) == (2, 3, 1, 1)
    assert counts.judged == 6  # the unparsable pair is counted but not in the denominator
    assert counts.win_rate == pytest.approx(2 / 6)
    assert counts.tie_rate == pytest.approx(3 / 6)
    assert counts.lose_rate == pytest.approx(1 / 6)
    assert counts.net_win_rate == pytest.approx(2 / 6 - 1 / 6)
    assert counts.win_rate is not None and counts.lose_rate is not None
    assert counts.net_win_rate == pytest.approx(counts.win_rate - counts.lose_rate)


def test_verdicts_by_category_and_empty_rates() -> None:
    table, overall = verdicts_by_category(
        [("coding", "lose"), ("coding", "lose"), ("coding", "win"), ("writing", "unparsable")]
    )
    assert table["coding"].net_win_rate == pytest.approx((1 - 2) / 3)
    assert table["writing"].judged == 0 and table["writing"].net_win_rate is None
    assert table["writing"].as_dict()["unparsable"] == 1
    assert overall.judged == 3 and overall.unparsable == 1


# -- routing -------------------------------------------------------------------------------------------


def test_router_counts_by_hand() -> None:
    counts = RouterCounts.of(
        [
            (True, True),  # suitable, routed to SoT
            (True, True),
            (True, False),  # suitable, routed to normal
            (False, False),
            (False, True),  # unsuitable, routed to SoT
            (None, True),  # unlabelled: not in accuracy
        ]
    )
    assert (counts.true_sot, counts.false_normal, counts.true_normal, counts.false_sot) == (2, 1, 1, 1)
    assert counts.labelled == 5 and counts.unlabelled_sot == 1
    assert counts.accuracy == pytest.approx(3 / 5)
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.recall == pytest.approx(2 / 3)
    assert RouterCounts().accuracy is None


# -- the report's summary from hand-made records -------------------------------------------------------


def _answer(qid: str, category: str, mode: str, seconds: float, tokens: int, **extra: object) -> AnswerRecord:
    token_times = [seconds * (i + 1) / tokens for i in range(tokens)] if mode == "normal" else []
    result = Result(
        mode_requested=mode,  # type: ignore[arg-type]
        mode_used="normal" if mode == "normal" else extra.pop("used", "sot"),  # type: ignore[arg-type]
        answer=f"{mode} answer to {qid}",
        complete=True,
        finish_reason="stop",
        route=extra.pop("route", None),  # type: ignore[arg-type]
        backend="scripted",
        model="scripted",
        stats=Stats(total_seconds=seconds, completion_tokens=tokens, token_times=token_times),
    )
    return AnswerRecord(
        question_id=qid,
        category=category,
        question=f"question {qid}",
        mode=mode,  # type: ignore[arg-type]
        result=result,
        sot_suitable=extra.pop("label", None),  # type: ignore[arg-type]
        settings={"backend": "scripted", "model": "scripted"},
    )


def _judgement(qid: str, category: str, first: str, second: str) -> JudgementRecord:
    a, b = parse_scores(first), parse_scores(second)
    va, vb = order_verdict(a, candidate_first=True), order_verdict(b, candidate_first=False)
    return JudgementRecord(
        question_id=qid,
        category=category,
        candidate="sot",
        criterion="overall",
        prompt="sot-default/general",
        judge_backend="scripted",
        judge_model="scripted",
        prompt_set="sot-default",
        orders=[
            OrderJudgement(order="candidate_first", reply=first, scores=a, verdict=va),
            OrderJudgement(order="baseline_first", reply=second, scores=b, verdict=vb),
        ],
        verdict=combine_orders(va, vb),
    )


def test_summary_figures_by_hand(tmp_path: Path) -> None:
    sot_route = RouteDecided(mode="sot", router="heuristic", reason="list-like")
    normal_route = RouteDecided(mode="normal", router="heuristic", reason="code")
    records = [
        # generic: speed-ups 6/2 = 3 and 4/4 = 1; coding: 3/6 = 0.5
        _answer("g1", "generic", "normal", 6.0, 300, label=True),
        _answer("g1", "generic", "sot", 2.0, 100, label=True),
        _answer("g1", "generic", "auto", 2.5, 100, label=True, route=sot_route),
        _answer("g2", "generic", "normal", 4.0, 200, label=True),
        _answer("g2", "generic", "sot", 4.0, 200, label=True),
        _answer("g2", "generic", "auto", 4.0, 200, label=True, route=normal_route, used="normal"),
        _answer("c1", "coding", "normal", 3.0, 100, label=False),
        _answer("c1", "coding", "sot", 6.0, 150, label=False),
        _answer("c1", "coding", "auto", 3.0, 100, label=False, route=normal_route, used="normal"),
        # A failed answer is left out of every figure.
        AnswerRecord(question_id="c2", category="coding", question="q", mode="sot", error="boom", error_kind="X"),
    ]
    results = tmp_path / "r.results.jsonl"
    write_records(results, records)
    judgements = tmp_path / "r.judgements.jsonl"
    write_records(
        judgements,
        [
            _judgement("g1", "generic", "8 6", "6 8"),  # win
            _judgement("g2", "generic", "9 5", "9 5"),  # orders disagree -> tie
            _judgement("c1", "coding", "4 8", "8 4"),  # lose
        ],
    )
    summary = summarize(load_records(results, AnswerRecord), load_records(judgements, JudgementRecord))

    sot = summary["speedup"]["sot"]
    assert sot["by_category"]["generic"]["median"] == pytest.approx(2.0)  # median of 3 and 1
    assert sot["by_category"]["generic"]["geomean"] == pytest.approx(math.sqrt(3.0))
    assert sot["by_category"]["coding"]["geomean"] == pytest.approx(0.5)
    assert sot["overall"]["n"] == 3
    assert sot["overall"]["median"] == pytest.approx(1.0)
    assert sot["overall"]["geomean"] == pytest.approx(1.5 ** (1 / 3))
    auto = summary["speedup"]["auto"]
    assert auto["overall"]["geomean"] == pytest.approx((6 / 2.5 * 1.0 * 1.0) ** (1 / 3))

    # Equal length: g1's normal answer reached 100 tokens at 6 * 100/300 = 2 s; SoT took 2 s -> x1.
    # g2: 200 tokens at 4 s vs 4 s -> x1. c1: SoT wrote 150 tokens, normal only 100: not compared (counted).
    eq = summary["equal_length_speedup"]["sot"]
    assert eq["by_category"]["generic"]["geomean"] == pytest.approx(1.0)
    assert "coding" not in eq["by_category"] and eq["overall"]["n"] == 2 and eq["too_short"] == 1
    assert summary["per_question"]["sot"][-1]["equal_length_speedup"] is None
    interval = sot["overall_interval"]["geomean"]
    assert interval["low"] <= sot["overall"]["geomean"] <= interval["high"] and interval["level"] == 0.95
    assert summary["bootstrap"]["seed"] == 0

    assert summary["answers"]["sot"] == {
        "answers": 4,
        "ok": 3,
        "failed": 1,
        "truncated": 0,
        "fallbacks": 0,
        "used_sot": 3,
        "used_normal": 0,
    }
    assert summary["latency_seconds"]["normal"]["overall"]["median"] == pytest.approx(4.0)
    assert summary["completion_tokens"]["sot"]["by_category"]["generic"]["mean"] == pytest.approx(150.0)

    quality = summary["quality"]["overall"]["sot"]
    assert quality["overall"]["win"] == 1 and quality["overall"]["tie"] == 1 and quality["overall"]["lose"] == 1
    assert quality["overall"]["net_win_rate"] == pytest.approx(0.0)
    assert quality["by_category"]["generic"]["net_win_rate"] == pytest.approx(0.5)  # (1 - 0) / 2
    assert quality["by_category"]["coding"]["net_win_rate"] == pytest.approx(-1.0)
    assert quality["orders_disagreed"] == 1
    assert quality["score_lines"]["replies"] == 6
    assert quality["score_lines"]["most_frequent"][0] == {"scores": "9 5", "count": 2}

    router = summary["router"]["overall"]
    # g1 suitable -> SoT (agree), g2 suitable -> normal (disagree), c1 unsuitable -> normal (agree)
    assert (router["true_sot"], router["false_normal"], router["true_normal"]) == (1, 1, 1)
    assert router["accuracy"] == pytest.approx(2 / 3)
    assert summary["router"]["routers"] == ["heuristic"]


@pytest.mark.parametrize(
    "module",
    [
        "sot.eval.metrics",
        "sot.eval.judge",
        "sot.eval.dataset",
        "sot.eval.runner",
        "sot.eval.equal_length",
        "sot.eval.spread",
        "sot.testing.replay",
    ],
)
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(module))
    assert failures == 0
