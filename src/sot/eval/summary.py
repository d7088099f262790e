"""Every figure of an evaluation report, as one JSON-ready dict computed from the records (this is summary.json).

`summarize` is a pure function of a results file (and a judgements file): speed-ups by category (plain and
at equal length, `sot.eval.equal_length`, the definition `sot bench` uses too; questions whose normal answer
is shorter than the candidate's are counted, not compared) with 95% bootstrap intervals over questions
(`sot.eval.spread`), latency and answer length by mode, where a skeleton answer's time goes, router
decisions against the labels, and judged quality. The Markdown report (`sot.eval.report_markdown`) and the
charts (`sot.eval.report_charts`) only format what it returns. It runs no model.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sot import __version__
from sot.eval.equal_length import Timeline, equal_length_speedup
from sot.eval.judge import LLMZOO_METRICS, OVERALL
from sot.eval.metrics import (
    Distribution,
    as_dicts,
    by_category,
    routes_by_category,
    speedup,
    verdicts_by_category,
)
from sot.eval.records import AnswerRecord, JudgementRecord, RecordFile
from sot.eval.runner import MODES
from sot.eval.spread import bootstrap_settings, intervals
from sot.events import Stats

LABELS = {"normal": "normal", "sot": "SoT", "auto": "SoT-R"}
CANDIDATE_MODES = ("sot", "auto")

Answers = dict[tuple[str, str], AnswerRecord]


def equal_length_row(normal: Stats, candidate: Stats) -> float | None:
    """A question's equal-length speed-up from both answers' stats (None: the normal answer is shorter)."""
    return equal_length_speedup(Timeline.from_stats(normal), candidate.completion_tokens, candidate.total_seconds)


def _per_question(answers: Answers, candidate: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (qid, mode), record in answers.items():
        if mode != candidate:
            continue
        normal = answers.get((qid, "normal"))
        if normal is None or normal.result is None or record.result is None:
            continue
        n_stats, c_stats = normal.result.stats, record.result.stats
        if n_stats.total_seconds <= 0 or c_stats.total_seconds <= 0:
            continue
        rows.append(
            {
                "question_id": qid,
                "category": record.category,
                "normal_seconds": n_stats.total_seconds,
                "candidate_seconds": c_stats.total_seconds,
                "speedup": speedup(n_stats.total_seconds, c_stats.total_seconds),
                "normal_tokens": n_stats.completion_tokens,
                "candidate_tokens": c_stats.completion_tokens,
                "equal_length_speedup": equal_length_row(n_stats, c_stats),
                "candidate_mode_used": record.result.mode_used,
            }
        )
    return rows


def _mode_stats(records: list[AnswerRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    results = [r.result for r in ok if r.result is not None]
    return {
        "answers": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "truncated": sum(not r.complete for r in results),
        "fallbacks": sum(r.fallback_reason is not None for r in results),
        "used_sot": sum(r.mode_used == "sot" for r in results),
        "used_normal": sum(r.mode_used == "normal" for r in results),
    }


def _quality(judgements: RecordFile[JudgementRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    records = list(judgements)
    criteria = [OVERALL, *LLMZOO_METRICS]
    criteria += sorted({r.criterion for r in records} - set(criteria))
    for criterion in criteria:
        for candidate in CANDIDATE_MODES:
            chosen = [r for r in records if r.criterion == criterion and r.candidate == candidate]
            if chosen:
                out.setdefault(criterion, {})[candidate] = _quality_of(chosen)
    return out


def _quality_of(chosen: list[JudgementRecord]) -> dict[str, Any]:
    ok = [r for r in chosen if r.ok and r.verdict is not None]
    table, overall = verdicts_by_category((r.category, r.verdict) for r in ok if r.verdict is not None)
    return {
        "by_category": as_dicts(table),
        "overall": overall.as_dict(),
        "failed": len(chosen) - len(ok),
        "identical": sum(r.identical for r in ok),
        # Orders that disagreed on a parsable pair: how much position bias the judge showed.
        "orders_disagreed": sum(1 for r in ok if _orders_disagree(r)),
        # The judge's most frequent score lines: a judge that always writes the same pair says nothing.
        "score_lines": _score_lines(ok),
        "judges": sorted({f"{r.judge_backend}/{r.judge_model}" for r in chosen}),
        "prompts": sorted({r.prompt for r in chosen}),
    }


def _score_lines(records: list[JudgementRecord], top: int = 5) -> dict[str, Any]:
    lines: dict[str, int] = {}
    replies = 0
    for record in records:
        for order in record.orders:
            replies += 1
            key = "unparsable" if order.scores is None else f"{order.scores[0]:g} {order.scores[1]:g}"
            lines[key] = lines.get(key, 0) + 1
    ranked = sorted(lines.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"replies": replies, "most_frequent": [{"scores": k, "count": v} for k, v in ranked]}


def _orders_disagree(record: JudgementRecord) -> bool:
    return (
        len(record.orders) == 2
        and record.verdict != "unparsable"
        and record.orders[0].verdict != record.orders[1].verdict
    )


def _header(answers: RecordFile[AnswerRecord], judgements: RecordFile[JudgementRecord] | None) -> dict[str, Any]:
    """Where the figures come from: files, backend, settings, questions, modes and answer counts."""
    records = list(answers)
    modes = [m for m in MODES if any(r.mode == m for r in records)]
    questions = {r.question_id: r for r in records}
    categories = {r.category for r in records}
    settings = next((r.settings for r in answers.ok), {})
    return {
        "generated_by": f"sot eval report (sot {__version__})",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results_file": str(answers.path),
        "judgements_file": str(judgements.path) if judgements is not None else None,
        "backend": settings.get("backend"),
        "model": settings.get("model"),
        "settings": settings,
        "questions": len(questions),
        "categories": dict(sorted(_count(r.category for r in questions.values()).items())),
        "modes": modes,
        "unreadable_lines": answers.bad_lines,
        "answers": {m: _mode_stats([r for r in records if r.mode == m]) for m in modes},
        "answers_by_category": {
            m: {c: _mode_stats([r for r in records if r.mode == m and r.category == c]) for c in sorted(categories)}
            for m in modes
        },
        # Time spent answering: the sum of per-answer wall times (the run's duration at concurrency 1).
        "answering_seconds": sum(r.wall_seconds or 0.0 for r in records),
        "recorded_from": min((r.recorded_at for r in records if r.recorded_at), default=None),
        "recorded_to": max((r.recorded_at for r in records if r.recorded_at), default=None),
        "load_average": Distribution.of(r.load_average for r in answers.ok if r.load_average is not None).as_dict(),
    }


def _speed(ok: Answers, modes: list[str]) -> dict[str, Any]:
    """Speed-ups by category for each candidate mode, plain and at equal length, and the per-question rows."""
    speed: dict[str, Any] = {}
    equal: dict[str, Any] = {}
    per_question: dict[str, Any] = {}
    for candidate in CANDIDATE_MODES:
        if candidate not in modes or "normal" not in modes:
            continue
        rows = _per_question(ok, candidate)
        per_question[candidate] = rows
        compared = [r for r in rows if r["equal_length_speedup"] is not None]
        spread = intervals(
            {
                "speedup": [(r["question_id"], r["speedup"]) for r in rows],
                "equal": [(r["question_id"], r["equal_length_speedup"]) for r in compared],
            }
        )
        table, overall = by_category((r["category"], r["speedup"]) for r in rows)
        speed[candidate] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
        speed[candidate]["overall_interval"] = _interval_dicts(spread["speedup"])
        table, overall = by_category((r["category"], r["equal_length_speedup"]) for r in compared)
        equal[candidate] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
        equal[candidate]["overall_interval"] = _interval_dicts(spread["equal"])
        # Questions whose normal answer is shorter than the candidate's: counted, never extrapolated.
        equal[candidate]["too_short"] = len(rows) - len(compared)
    return {
        "speedup": speed,
        "equal_length_speedup": equal,
        "per_question": per_question,
        "bootstrap": bootstrap_settings(),
    }


def _interval_dicts(by_statistic: dict[str, Any]) -> dict[str, Any]:
    return {stat: None if interval is None else interval.as_dict() for stat, interval in by_statistic.items()}


def _latency_and_tokens(ok: Answers, modes: list[str]) -> dict[str, Any]:
    latency: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    for mode in modes:
        done = [(r.category, r.result) for r in ok.values() if r.mode == mode and r.result is not None]
        table, overall = by_category((category, result.stats.total_seconds) for category, result in done)
        latency[mode] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
        table, overall = by_category((category, float(result.stats.completion_tokens)) for category, result in done)
        tokens[mode] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
    return {"latency_seconds": latency, "completion_tokens": tokens}


def _routing(ok: Answers) -> dict[str, Any]:
    """Router decisions against the labels. A route by router "none" is the engine's auto mode without a
    router (it answers with SoT): no decision, only counted."""
    routes = [
        (r, r.result.route)
        for r in ok.values()
        if r.mode == "auto" and r.result is not None and r.result.route is not None
    ]
    routed = [(r, route) for r, route in routes if route.router != "none"]
    out: dict[str, Any] = {"auto_without_router": len(routes) - len(routed), "router": None}
    if routed:
        table, overall = routes_by_category((r.category, r.sot_suitable, route.mode == "sot") for r, route in routed)
        out["router"] = {
            "routers": sorted({route.router for _, route in routed}),
            "by_category": as_dicts(table),
            "overall": overall.as_dict(),
        }
    return out


def summarize(
    answers: RecordFile[AnswerRecord], judgements: RecordFile[JudgementRecord] | None = None
) -> dict[str, Any]:
    """Every figure of the report, as a JSON-ready dict (this is summary.json)."""
    summary = _header(answers, judgements)
    modes: list[str] = summary["modes"]
    ok = {r.key: r for r in answers.ok}
    speed = _speed(ok, modes)
    summary["speedup"] = speed["speedup"]
    summary["equal_length_speedup"] = speed["equal_length_speedup"]
    summary["bootstrap"] = speed["bootstrap"]
    summary.update(_latency_and_tokens(ok, modes))
    summary["sot_anatomy"] = {
        m: _anatomy([r for r in ok.values() if r.mode == m]) for m in CANDIDATE_MODES if m in modes
    }
    routing = _routing(ok)
    summary["auto_without_router"] = routing["auto_without_router"]
    summary["router"] = routing["router"]
    summary["quality"] = _quality(judgements) if judgements is not None else {}
    summary["per_question"] = speed["per_question"]
    return summary


def _anatomy(records: list[AnswerRecord]) -> dict[str, Any]:
    """Where a skeleton answer's time goes: skeleton, then the parallel expansion (answers that used SoT)."""
    used = [r.result for r in records if r.result is not None and r.result.mode_used == "sot"]
    stats = [r.stats for r in used if r.stats.skeleton_seconds is not None]
    return {
        "answers": len(used),
        "points": Distribution.of(float(len(r.points)) for r in used).as_dict(),
        "skeleton_seconds": Distribution.of(s.skeleton_seconds or 0.0 for s in stats).as_dict(),
        "expansion_seconds": Distribution.of(s.total_seconds - (s.skeleton_seconds or 0.0) for s in stats).as_dict(),
        "slowest_point_seconds": Distribution.of(s.slowest_point_seconds for s in stats).as_dict(),
    }


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
