"""`sot eval report`: turn a results file (and a judgements file) into summary.json, report.md and PNG charts.

Every number comes from `summarize`, a pure function of the records; the Markdown and the charts only
format what it returns, and summary.json is that same dict, so machines and people read the same figures.
It runs no model. Charts need matplotlib (the `eval` extra) and are drawn with the Agg backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sot import __version__
from sot.errors import ConfigError
from sot.eval.judge import LLMZOO_METRICS, OVERALL
from sot.eval.metrics import (
    Distribution,
    as_dicts,
    by_category,
    routes_by_category,
    speedup,
    time_to_tokens,
    verdicts_by_category,
)
from sot.eval.records import AnswerRecord, JudgementRecord, RecordFile, load_records
from sot.eval.runner import MODES

LABELS = {"normal": "normal", "sot": "SoT", "auto": "SoT-R"}
CANDIDATE_MODES = ("sot", "auto")
_COLORS = {
    "normal": "#7f7f7f",
    "sot": "#1f77b4",
    "auto": "#ff7f0e",
    "win": "#2ca02c",
    "tie": "#c7c7c7",
    "lose": "#d62728",
}


# -- numbers ---------------------------------------------------------------------------------------------


def _per_question(answers: dict[tuple[str, str], AnswerRecord], candidate: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (qid, mode), record in answers.items():
        if mode != candidate:
            continue
        normal = answers.get((qid, "normal"))
        if normal is None:
            continue
        assert record.result is not None and normal.result is not None
        n_stats, c_stats = normal.result.stats, record.result.stats
        if n_stats.total_seconds <= 0 or c_stats.total_seconds <= 0:
            continue
        equal = time_to_tokens(
            n_stats.token_times, n_stats.total_seconds, n_stats.completion_tokens, c_stats.completion_tokens
        )
        rows.append(
            {
                "question_id": qid,
                "category": record.category,
                "normal_seconds": n_stats.total_seconds,
                "candidate_seconds": c_stats.total_seconds,
                "speedup": speedup(n_stats.total_seconds, c_stats.total_seconds),
                "normal_tokens": n_stats.completion_tokens,
                "candidate_tokens": c_stats.completion_tokens,
                "equal_length_speedup": equal / c_stats.total_seconds if equal > 0 else None,
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
            if not chosen:
                continue
            ok = [r for r in chosen if r.ok and r.verdict is not None]
            table, overall = verdicts_by_category((r.category, r.verdict) for r in ok if r.verdict is not None)
            judges = sorted({f"{r.judge_backend}/{r.judge_model}" for r in chosen})
            prompts = sorted({r.prompt for r in chosen})
            out.setdefault(criterion, {})[candidate] = {
                "by_category": as_dicts(table),
                "overall": overall.as_dict(),
                "failed": len(chosen) - len(ok),
                "identical": sum(r.identical for r in ok),
                # Orders that disagreed on a parsable pair: how much position bias the judge showed.
                "orders_disagreed": sum(1 for r in ok if _orders_disagree(r)),
                # The judge's most frequent score lines: a judge that always writes the same pair says nothing.
                "score_lines": _score_lines(ok),
                "judges": judges,
                "prompts": prompts,
            }
    return out


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


def summarize(
    answers: RecordFile[AnswerRecord], judgements: RecordFile[JudgementRecord] | None = None
) -> dict[str, Any]:
    """Every figure of the report, as a JSON-ready dict (this is summary.json)."""
    records = list(answers)
    ok = {r.key: r for r in answers.ok}
    modes = [m for m in MODES if any(r.mode == m for r in records)]
    questions = {r.question_id: r for r in records}
    categories = {r.category for r in records}
    settings = next((r.settings for r in answers.ok), {})
    summary: dict[str, Any] = {
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
    speed: dict[str, Any] = {}
    equal: dict[str, Any] = {}
    per_question: dict[str, Any] = {}
    for candidate in CANDIDATE_MODES:
        if candidate not in modes or "normal" not in modes:
            continue
        rows = _per_question(ok, candidate)
        per_question[candidate] = rows
        table, overall = by_category((r["category"], r["speedup"]) for r in rows)
        speed[candidate] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
        eq_rows = [(r["category"], r["equal_length_speedup"]) for r in rows if r["equal_length_speedup"]]
        table, overall = by_category(eq_rows)
        equal[candidate] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
    summary["speedup"] = speed
    summary["equal_length_speedup"] = equal
    latency: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    for mode in modes:
        done = [r for r in ok.values() if r.mode == mode and r.result is not None]
        table, overall = by_category((r.category, r.seconds) for r in done)
        latency[mode] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
        table, overall = by_category(
            (r.category, float(r.result.stats.completion_tokens)) for r in done if r.result is not None
        )
        tokens[mode] = {"by_category": as_dicts(table), "overall": overall.as_dict()}
    summary["latency_seconds"] = latency
    summary["completion_tokens"] = tokens
    summary["sot_anatomy"] = {
        m: _anatomy([r for r in ok.values() if r.mode == m]) for m in CANDIDATE_MODES if m in modes
    }
    # A route by router "none" is the engine's auto mode without a router (it answers with SoT): no decision.
    routed = [
        r
        for r in ok.values()
        if r.mode == "auto" and r.result is not None and r.result.route is not None and r.result.route.router != "none"
    ]
    summary["auto_without_router"] = sum(
        1
        for r in ok.values()
        if r.mode == "auto" and r.result is not None and r.result.route is not None and r.result.route.router == "none"
    )
    if routed:
        table_r, overall_r = routes_by_category(
            (r.category, r.sot_suitable, r.result.route.mode == "sot")
            for r in routed
            if r.result is not None and r.result.route is not None
        )
        summary["router"] = {
            "routers": sorted({r.result.route.router for r in routed if r.result and r.result.route}),
            "by_category": as_dicts(table_r),
            "overall": overall_r.as_dict(),
        }
    else:
        summary["router"] = None
    summary["quality"] = _quality(judgements) if judgements is not None else {}
    summary["per_question"] = per_question
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


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# -- formatting ------------------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _categories(summary: dict[str, Any]) -> list[str]:
    return list(summary["categories"])


def _figures(data: dict[str, Any], category: str | None) -> dict[str, Any]:
    """One category's figures from a {"overall": ..., "by_category": ...} block (None or "overall": the
    overall ones; {} for a category with none)."""
    return data["overall"] if category in (None, "overall") else data["by_category"].get(category, {})


def _bar_positions(series: int, n_series: int, n_ticks: int, width: float) -> list[float]:
    """Where the bars of series `series` of `n_series` go, side by side around each of `n_ticks` ticks."""
    return [k + (series - (n_series - 1) / 2) * width for k in range(n_ticks)]


def headline(summary: dict[str, Any]) -> list[str]:
    """The few sentences a reader needs: speed-up, judged quality, routing."""
    lines: list[str] = []
    for candidate, data in summary["speedup"].items():
        o = data["overall"]
        eq = summary["equal_length_speedup"].get(candidate, {}).get("overall", {})
        lines.append(
            f"- **{LABELS[candidate]} speed-up** over normal decoding: median {_x(o['median'])}, geometric mean "
            f"{_x(o['geomean'])} over {o['n']} questions (range {_x(o['min'])}–{_x(o['max'])}); at equal answer "
            f"length: geometric mean {_x(eq.get('geomean'))}."
        )
    tokens = summary["completion_tokens"]
    if "normal" in tokens and "sot" in tokens:
        lines.append(
            f"- **Answer length**: normal answers averaged {tokens['normal']['overall']['mean']:.0f} tokens, SoT "
            f"answers {tokens['sot']['overall']['mean']:.0f} (skeleton and points included); "
            f"{summary['answers']['normal']['truncated']} of {summary['answers']['normal']['ok']} normal answers "
            "hit the token limit."
        )
    overall_quality = summary["quality"].get(OVERALL, {})
    for candidate, data in overall_quality.items():
        o = data["overall"]
        lines.append(
            f"- **{LABELS[candidate]} vs normal, judged**: net win rate {_signed(o['net_win_rate'])} (win "
            f"{_pct(o['win_rate'])}, tie {_pct(o['tie_rate'])}, lose {_pct(o['lose_rate'])} of {o['judged']} judged "
            f"pairs; {o['unparsable']} unparsable, {data['failed']} failed)."
        )
    router = summary.get("router")
    if router:
        o = router["overall"]
        lines.append(
            f"- **Router** ({', '.join(router['routers'])}): agreed with the dataset's labels on "
            f"{_pct(o['accuracy'])} of {o['labelled']} labelled questions (precision {_pct(o['precision'])}, "
            f'recall {_pct(o["recall"])} for "use SoT").'
        )
    return lines


def render_markdown(
    summary: dict[str, Any], charts: dict[str, str], *, title: str | None = None, notes: Sequence[str] = ()
) -> str:
    """report.md from the summary (and the chart files, by name)."""
    out: list[str] = []
    categories = _categories(summary)
    modes = summary["modes"]
    out.append(f"# {title or 'Skeleton-of-Thought evaluation'}")
    out.append("")
    settings = summary["settings"]
    out.append(
        f"{summary['questions']} questions in {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}, "
        "answered in "
        f"{', '.join(LABELS[m] for m in modes)} mode on backend `{summary['backend']}`, model `{summary['model']}`"
        f" (prompts `{settings.get('prompts')}`, {settings.get('concurrency')} question(s) at a time). "
        f"Generated by `{summary['generated_by']}` from `{Path(summary['results_file']).name}`"
        + (f" and `{Path(summary['judgements_file']).name}`." if summary["judgements_file"] else ".")
    )
    out.append("")
    for note in notes:
        out.append(note)
        out.append("")
    out.append("## Headline")
    out.append("")
    out += headline(summary) or ["- Nothing to compare: run at least `normal` and one of `sot`, `auto`."]
    if summary["auto_without_router"]:
        out.append(
            f"- {summary['auto_without_router']} SoT-R answer(s) had no router configured and were answered with "
            "SoT: they say nothing about routing."
        )
    out.append("")

    if summary["speedup"]:
        out.append("## Speed-up by category")
        out.append("")
        out.append(
            "Speed-up of a question = normal latency / candidate latency (end-to-end, as the engine measured "
            "it). *Equal length* compares with the time normal decoding took to write as many tokens as the "
            "candidate's answer has: it separates being faster from writing less."
        )
        out.append("")
        header = ["category", "n"]
        for c in summary["speedup"]:
            header += [f"{LABELS[c]} median", f"{LABELS[c]} geomean", f"{LABELS[c]} geomean, equal length"]
        rows = []
        for cat in [*categories, None]:
            first = next(iter(summary["speedup"].values()))
            n = _figures(first, cat).get("n", 0)
            row = ["**overall**" if cat is None else cat, str(n)]
            for c, data in summary["speedup"].items():
                d = _figures(data, cat)
                e = _figures(summary["equal_length_speedup"][c], cat)
                row += [_x(d.get("median")), _x(d.get("geomean")), _x(e.get("geomean"))]
            rows.append(row)
        out += _table(header, rows)
        out.append("")
        if "speedup" in charts:
            out.append(f"![Speed-up by category]({charts['speedup']})")
            out.append("")

    out.append("## Latency and answer length")
    out.append("")
    header = ["category"]
    header += [f"{LABELS[m]} median s" for m in modes]
    header += [f"{LABELS[m]} p90 s" for m in modes]
    header += [f"{LABELS[m]} mean tokens" for m in modes]
    rows = []
    for cat in [*categories, None]:
        row = ["**overall**" if cat is None else cat]
        for key, stat in (("latency_seconds", "median"), ("latency_seconds", "p90"), ("completion_tokens", "mean")):
            for m in modes:
                d = _figures(summary[key][m], cat)
                value = d.get(stat)
                row.append(_s(value) if key == "latency_seconds" else ("–" if value is None else f"{value:.0f}"))
        rows.append(row)
    out += _table(header, rows)
    out.append("")
    if "latency" in charts:
        out.append(f"![Latency distributions]({charts['latency']})")
        out.append("")
    anatomy = {m: a for m, a in summary["sot_anatomy"].items() if a["answers"]}
    if anatomy:
        out.append("Where a skeleton answer's time goes (answers that used SoT; medians):")
        out.append("")
        rows = [
            [
                LABELS[m],
                str(a["answers"]),
                _s(a["points"]["mean"]),
                _s(a["skeleton_seconds"]["median"]),
                _s(a["expansion_seconds"]["median"]),
                _s(a["slowest_point_seconds"]["median"]),
            ]
            for m, a in anatomy.items()
        ]
        out += _table(
            ["mode", "answers", "mean points", "skeleton s", "expansion s", "slowest point s"],
            rows,
        )
        out.append("")

    quality = summary["quality"]
    if quality:
        out.append("## Judged quality")
        out.append("")
        out.append(
            "Each candidate answer was judged against the normal answer in both orders. A pair is a win or a "
            "loss only when both orders agree; any disagreement is a tie (FastChat's convention). A pair with "
            "an unparsable reply in either order is `unparsable`: counted, but left out of the rates. Net win "
            "rate = win rate − lose rate. Identical answers (SoT-R routed to normal decoding, or SoT fell "
            "back to it, and the text came out the same) are ties without asking the judge."
        )
        out.append("")
        for criterion in quality:
            for candidate, data in quality[criterion].items():
                out.append(
                    f"### {criterion}: {LABELS[candidate]} vs normal "
                    f"(judge {', '.join(data['judges'])}; prompts {', '.join(data['prompts'])})"
                )
                out.append("")
                rows = []
                for cat in [*categories, None]:
                    d = data["overall"] if cat is None else data["by_category"].get(cat)
                    if d is None:
                        continue
                    rows.append(
                        [
                            "**overall**" if cat is None else cat,
                            str(d["win"]),
                            str(d["tie"]),
                            str(d["lose"]),
                            str(d["unparsable"]),
                            _pct(d["win_rate"]),
                            _pct(d["lose_rate"]),
                            _signed(d["net_win_rate"]),
                        ]
                    )
                out += _table(
                    ["category", "win", "tie", "lose", "unparsable", "win rate", "lose rate", "net win rate"], rows
                )
                out.append("")
                out.append(
                    f"{data['failed']} judgement(s) failed; {data['identical']} pair(s) were identical; the two "
                    f"orders disagreed on {data['orders_disagreed']} parsable pair(s)."
                )
                lines = data["score_lines"]
                if lines["replies"]:
                    frequent = ", ".join(
                        f"`{item['scores']}` ×{item['count']} ({_pct(item['count'] / lines['replies'])})"
                        for item in lines["most_frequent"]
                    )
                    out.append(f"Most frequent judge score lines, of {lines['replies']} replies: {frequent}.")
                out.append("")
        for key in ("win_tie_lose", "net_win_rate", "llmzoo"):
            if key in charts:
                out.append(f"![{key.replace('_', ' ')}]({charts[key]})")
                out.append("")

    router = summary.get("router")
    if router:
        out.append("## Router decisions vs labels")
        out.append("")
        o = router["overall"]
        out += _table(
            ["", "routed to SoT", "routed to normal"],
            [
                ["labelled suitable", str(o["true_sot"]), str(o["false_normal"])],
                ["labelled unsuitable", str(o["false_sot"]), str(o["true_normal"])],
                ["unlabelled", str(o["unlabelled_sot"]), str(o["unlabelled_normal"])],
            ],
        )
        out.append("")
        rows = []
        for cat, d in [*router["by_category"].items(), ("**overall**", o)]:
            suitable = d["true_sot"] + d["false_normal"]
            to_sot = d["true_sot"] + d["false_sot"] + d["unlabelled_sot"]
            rows.append([cat, str(d["labelled"]), str(suitable), str(to_sot), _pct(d["accuracy"])])
        out += _table(["category", "labelled", "labelled suitable", "routed to SoT", "agreement"], rows)
        out.append("")
        if "router" in charts:
            out.append(f"![Router decisions]({charts['router']})")
            out.append("")

    out.append("## Failures and flags")
    out.append("")
    rows = []
    for m in modes:
        a = summary["answers"][m]
        rows.append(
            [
                LABELS[m],
                str(a["answers"]),
                str(a["failed"]),
                str(a["truncated"]),
                str(a["fallbacks"]),
                str(a["used_sot"]),
                str(a["used_normal"]),
            ]
        )
    out += _table(["mode", "answers", "failed", "truncated", "fell back to normal", "used SoT", "used normal"], rows)
    out.append("")
    out.append("By category (truncated / fell back to normal, of the answers):")
    out.append("")
    rows = []
    for cat in categories:
        row = [cat]
        for m in modes:
            a = summary["answers_by_category"][m].get(cat)
            row.append("–" if a is None else f"{a['truncated']} / {a['fallbacks']} of {a['ok']}")
        rows.append(row)
    out += _table(["category", *(LABELS[m] for m in modes)], rows)
    out.append("")
    out.append(
        "Failed answers are left out of every figure and retried by running `sot eval run` again. Truncated "
        "answers (a token limit cut them) and SoT answers that fell back to normal decoding are included: "
        "they are what a user would have received."
    )
    if summary["unreadable_lines"]:
        out.append(f"Unreadable lines in the results file (skipped): {summary['unreadable_lines']}.")
    out.append("")
    out.append("## Settings")
    out.append("")
    out.append(
        f"Answers were recorded from {summary['recorded_from']} to {summary['recorded_to']}; answering took "
        f"{summary['answering_seconds'] / 60:.1f} min in total (sum of per-answer wall times)."
    )
    out.append("")
    load = summary["load_average"]
    if load["n"]:
        out.append(
            f"Machine load when answers started (1-minute load average): median {_s(load['median'])}, max "
            f"{_s(load['max'])}, on {settings.get('cpu_count', '?')} CPU(s). Load from other work inflates latency."
        )
        out.append("")
    out.append("```json")
    out.append(json.dumps(settings, indent=2, sort_keys=True))
    out.append("```")
    out.append("")
    out.append(
        "Latency is end-to-end per answer as the engine measured it (routing included for SoT-R). Questions "
        "answered concurrently share the machine, so per-question latency is honest only at low concurrency. "
        "Geometric means treat ×2 and ×0.5 symmetrically; medians resist outliers. All figures are also in "
        "`summary.json`."
    )
    out.append("")
    return "\n".join(out)


# -- charts ----------------------------------------------------------------------------------------------


def draw_charts(summary: dict[str, Any], answers: RecordFile[AnswerRecord], out_dir: Path) -> dict[str, str]:
    """PNG charts into `out_dir`; returns {chart: file name}. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display, deterministic output
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("charts need matplotlib: pip install 'sot[eval]' (or pass --no-charts)") from None
    charts: dict[str, str] = {}
    categories = _categories(summary)
    save: dict[str, Any] = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}}

    if summary["speedup"]:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(categories) + 2), 4.2))
        names = [*categories, "overall"]
        candidates = list(summary["speedup"])
        width = 0.8 / len(candidates)
        for i, c in enumerate(candidates):
            data = summary["speedup"][c]
            geo = [_figures(data, n).get("geomean") for n in names]
            med = [_figures(data, n).get("median") for n in names]
            xs = _bar_positions(i, len(candidates), len(names), width)
            ax.bar(xs, [g or 0 for g in geo], width, label=f"{LABELS[c]} geometric mean", color=_COLORS[c])
            ax.scatter(
                xs, [m or 0 for m in med], marker="D", color="black", s=14, zorder=3, label="median" if i == 0 else None
            )
            eq_data = summary["equal_length_speedup"][c]
            eq = [_figures(eq_data, n).get("geomean") for n in names]
            ax.scatter(
                xs,
                [e or 0 for e in eq],
                marker="o",
                facecolors="white",
                edgecolors="black",
                s=18,
                zorder=3,
                label="geometric mean at equal length" if i == 0 else None,
            )
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("speed-up over normal (×)")
        ax.set_title("Speed-up by category (normal latency / candidate latency)")
        ax.legend(fontsize=8)
        fig.savefig(out_dir / "speedup_by_category.png", **save)
        plt.close(fig)
        charts["speedup"] = "speedup_by_category.png"

    modes = summary["modes"]
    ok = [r for r in answers.ok if r.result is not None]
    if ok:
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(max(10.0, 1.1 * len(categories) + 5), 4.2), gridspec_kw={"width_ratios": [1, 3]}
        )
        data = [[r.seconds for r in ok if r.mode == m] for m in modes]
        box = left.boxplot(data, patch_artist=True, medianprops={"color": "black"})
        left.set_xticks(range(1, len(modes) + 1), [LABELS[m] for m in modes])
        for patch, m in zip(box["boxes"], modes, strict=True):
            patch.set_facecolor(_COLORS[m])
        left.set_ylabel("latency (s)")
        left.set_title("All questions")
        width = 0.8 / len(modes)
        for i, m in enumerate(modes):
            per_cat = [[r.seconds for r in ok if r.mode == m and r.category == c] or [float("nan")] for c in categories]
            positions = _bar_positions(i, len(modes), len(categories), width)
            b = right.boxplot(
                per_cat,
                positions=positions,
                widths=width * 0.9,
                patch_artist=True,
                manage_ticks=False,
                medianprops={"color": "black"},
                flierprops={"markersize": 3},
            )
            for patch in b["boxes"]:
                patch.set_facecolor(_COLORS[m])
            right.plot([], [], color=_COLORS[m], linewidth=6, label=LABELS[m])
        right.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        right.set_title("By category")
        right.legend(fontsize=8)
        fig.suptitle("Latency distributions")
        fig.savefig(out_dir / "latency_distribution.png", **save)
        plt.close(fig)
        charts["latency"] = "latency_distribution.png"

    overall_quality = summary["quality"].get(OVERALL, {})
    if overall_quality:
        fig, axes = plt.subplots(
            1,
            len(overall_quality),
            figsize=(7.0 * len(overall_quality), 0.45 * len(categories) + 2.4),
            squeeze=False,
            layout="constrained",
        )
        for ax, (c, data) in zip(axes[0], overall_quality.items(), strict=True):
            names = [n for n in categories if n in data["by_category"]] + ["overall"]
            rows = [_figures(data, n) for n in names]
            left_edge = [0.0] * len(names)
            for verdict in ("win", "tie", "lose"):
                values = [(r[f"{verdict}_rate"] or 0.0) for r in rows]
                ax.barh(names, values, left=left_edge, color=_COLORS[verdict], label=verdict)
                left_edge = [a + b for a, b in zip(left_edge, values, strict=True)]
            for y, r in enumerate(rows):
                ax.text(1.01, y, f"n={r['judged']}, unparsable {r['unparsable']}", va="center", fontsize=7)
            ax.set_xlim(0, 1.45)
            ax.invert_yaxis()
            ax.set_title(f"{LABELS[c]} vs normal", loc="left")
            ax.set_xlabel("share of judged pairs")
            ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
        fig.suptitle("Win / tie / lose by category (both orders must agree)")
        fig.savefig(out_dir / "win_tie_lose.png", **save)
        plt.close(fig)
        charts["win_tie_lose"] = "win_tie_lose.png"

        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(categories) + 2), 4.0))
        names = [*categories, "overall"]
        width = 0.8 / len(overall_quality)
        for i, (c, data) in enumerate(overall_quality.items()):
            values = [_figures(data, n).get("net_win_rate") for n in names]
            xs = _bar_positions(i, len(overall_quality), len(names), width)
            ax.bar(xs, [v or 0.0 for v in values], width, color=_COLORS[c], label=LABELS[c])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(-1, 1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("net win rate (win − lose)")
        ax.set_title("Net win rate against normal decoding, by category")
        ax.legend(fontsize=8)
        fig.savefig(out_dir / "net_win_rate.png", **save)
        plt.close(fig)
        charts["net_win_rate"] = "net_win_rate.png"

    metrics = [m for m in LLMZOO_METRICS if m in summary["quality"]]
    if metrics:
        fig, ax = plt.subplots(figsize=(7.0, 3.8))
        candidates = [c for c in CANDIDATE_MODES if any(c in summary["quality"][m] for m in metrics)]
        width = 0.8 / max(1, len(candidates))
        for i, c in enumerate(candidates):
            values = [summary["quality"][m].get(c, {}).get("overall", {}).get("net_win_rate") for m in metrics]
            xs = _bar_positions(i, len(candidates), len(metrics), width)
            ax.bar(xs, [v or 0.0 for v in values], width, color=_COLORS[c], label=LABELS[c])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(-1, 1)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel("net win rate")
        ax.set_title("LLMZoo metrics: net win rate against normal decoding")
        ax.legend(fontsize=8)
        fig.savefig(out_dir / "llmzoo_net_win_rate.png", **save)
        plt.close(fig)
        charts["llmzoo"] = "llmzoo_net_win_rate.png"

    router = summary.get("router")
    if router:
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(max(10.0, 0.9 * len(router["by_category"]) + 5), 4.0), gridspec_kw={"width_ratios": [1, 2]}
        )
        o = router["overall"]
        matrix = [[o["true_sot"], o["false_normal"]], [o["false_sot"], o["true_normal"]]]
        left.imshow(matrix, cmap="Blues")
        darkest = max(max(row) for row in matrix) or 1
        for y in range(2):
            for x in range(2):
                color = "white" if matrix[y][x] > darkest / 2 else "black"  # readable on dark cells
                left.text(x, y, str(matrix[y][x]), ha="center", va="center", fontsize=12, color=color)
        left.set_xticks([0, 1], ["routed SoT", "routed normal"])
        left.set_yticks([0, 1], ["suitable", "unsuitable"])
        left.set_title(f"Router vs labels (agreement {_pct(o['accuracy'])})")
        names = list(router["by_category"])
        suitable = [router["by_category"][n]["true_sot"] + router["by_category"][n]["false_normal"] for n in names]
        to_sot = [
            router["by_category"][n]["true_sot"]
            + router["by_category"][n]["false_sot"]
            + router["by_category"][n]["unlabelled_sot"]
            for n in names
        ]
        sizes = [
            router["by_category"][n]["labelled"]
            + router["by_category"][n]["unlabelled_sot"]
            + router["by_category"][n]["unlabelled_normal"]
            for n in names
        ]
        slots = range(len(names))
        right.bar(
            [x - 0.2 for x in slots],
            [s / n if n else 0 for s, n in zip(suitable, sizes, strict=True)],
            0.4,
            color="#9467bd",
            label="labelled suitable",
        )
        right.bar(
            [x + 0.2 for x in slots],
            [s / n if n else 0 for s, n in zip(to_sot, sizes, strict=True)],
            0.4,
            color=_COLORS["sot"],
            label="routed to SoT",
        )
        right.set_xticks(list(slots), names, rotation=30, ha="right")
        right.set_ylim(0, 1.05)
        right.set_ylabel("share of the category's questions")
        right.set_title("By category")
        right.legend(fontsize=8)
        fig.savefig(out_dir / "router.png", **save)
        plt.close(fig)
        charts["router"] = "router.png"
    return charts


# -- the whole report ------------------------------------------------------------------------------------


@dataclass
class ReportFiles:
    """What `write_report` produced."""

    directory: Path
    markdown: Path
    summary: Path
    charts: list[Path] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # the summary itself, as written to summary.json


def write_report(
    results: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    judgements: str | os.PathLike[str] | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
    charts: bool = True,
) -> ReportFiles:
    """Read the files, compute every figure once, and write summary.json, report.md and the charts."""
    answers = load_records(results, AnswerRecord)
    if not answers.records:
        raise ConfigError(f"{results}: no answer records")
    judged = load_records(judgements, JudgementRecord) if judgements is not None else None
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    summary = summarize(answers, judged)
    drawn = draw_charts(summary, answers, directory) if charts else {}
    summary["charts"] = drawn
    markdown = directory / "report.md"
    markdown.write_text(render_markdown(summary, drawn, title=title, notes=notes), encoding="utf-8")
    summary_path = directory / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return ReportFiles(directory, markdown, summary_path, [directory / name for name in drawn.values()], summary)
