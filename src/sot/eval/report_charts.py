"""PNG charts of an evaluation summary: speed-up, latency, win/tie/lose, net win rates, LLMZoo, router.

Each chart is drawn from the figures `sot.eval.summary.summarize` computed (the latency boxes from the
records themselves), with matplotlib's Agg backend (the `eval` extra), one function per chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sot.errors import ConfigError
from sot.eval.judge import LLMZOO_METRICS, OVERALL
from sot.eval.records import AnswerRecord, RecordFile
from sot.eval.report_markdown import categories_of, figures
from sot.eval.summary import CANDIDATE_MODES, LABELS

COLORS = {
    "normal": "#7f7f7f",
    "sot": "#1f77b4",
    "auto": "#ff7f0e",
    "win": "#2ca02c",
    "tie": "#c7c7c7",
    "lose": "#d62728",
}
SAVE: dict[str, Any] = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def bar_positions(series: int, n_series: int, n_ticks: int, width: float) -> list[float]:
    """Where the bars of series `series` of `n_series` go, side by side around each of `n_ticks` ticks."""
    return [k + (series - (n_series - 1) / 2) * width for k in range(n_ticks)]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display, deterministic output
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("charts need matplotlib: pip install 'sot[eval]' (or pass --no-charts)") from None
    return plt


def _save(plt: Any, fig: Any, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, **SAVE)
    plt.close(fig)
    return name


def _speedup_chart(plt: Any, summary: dict[str, Any], out_dir: Path) -> str:
    categories = categories_of(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(categories) + 2), 4.2))
    names = [*categories, "overall"]
    candidates = list(summary["speedup"])
    width = 0.8 / len(candidates)
    for i, c in enumerate(candidates):
        data = summary["speedup"][c]
        geo = [figures(data, n).get("geomean") for n in names]
        med = [figures(data, n).get("median") for n in names]
        xs = bar_positions(i, len(candidates), len(names), width)
        ax.bar(xs, [g or 0 for g in geo], width, label=f"{LABELS[c]} geometric mean", color=COLORS[c])
        ax.scatter(
            xs, [m or 0 for m in med], marker="D", color="black", s=14, zorder=3, label="median" if i == 0 else None
        )
        eq = [figures(summary["equal_length_speedup"][c], n).get("geomean") for n in names]
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
    return _save(plt, fig, out_dir, "speedup_by_category.png")


def _latency_chart(plt: Any, summary: dict[str, Any], ok: list[AnswerRecord], out_dir: Path) -> str:
    categories = categories_of(summary)
    modes = summary["modes"]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(10.0, 1.1 * len(categories) + 5), 4.2), gridspec_kw={"width_ratios": [1, 3]}
    )
    data = [[r.seconds for r in ok if r.mode == m] for m in modes]
    box = left.boxplot(data, patch_artist=True, medianprops={"color": "black"})
    left.set_xticks(range(1, len(modes) + 1), [LABELS[m] for m in modes])
    for patch, m in zip(box["boxes"], modes, strict=True):
        patch.set_facecolor(COLORS[m])
    left.set_ylabel("latency (s)")
    left.set_title("All questions")
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        per_cat = [[r.seconds for r in ok if r.mode == m and r.category == c] or [float("nan")] for c in categories]
        b = right.boxplot(
            per_cat,
            positions=bar_positions(i, len(modes), len(categories), width),
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
            medianprops={"color": "black"},
            flierprops={"markersize": 3},
        )
        for patch in b["boxes"]:
            patch.set_facecolor(COLORS[m])
        right.plot([], [], color=COLORS[m], linewidth=6, label=LABELS[m])
    right.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    right.set_title("By category")
    right.legend(fontsize=8)
    fig.suptitle("Latency distributions")
    return _save(plt, fig, out_dir, "latency_distribution.png")


def _win_tie_lose_chart(plt: Any, summary: dict[str, Any], overall_quality: dict[str, Any], out_dir: Path) -> str:
    categories = categories_of(summary)
    fig, axes = plt.subplots(
        1,
        len(overall_quality),
        figsize=(7.0 * len(overall_quality), 0.45 * len(categories) + 2.4),
        squeeze=False,
        layout="constrained",
    )
    for ax, (c, data) in zip(axes[0], overall_quality.items(), strict=True):
        names = [n for n in categories if n in data["by_category"]] + ["overall"]
        rows = [figures(data, n) for n in names]
        left_edge = [0.0] * len(names)
        for verdict in ("win", "tie", "lose"):
            values = [(r[f"{verdict}_rate"] or 0.0) for r in rows]
            ax.barh(names, values, left=left_edge, color=COLORS[verdict], label=verdict)
            left_edge = [a + b for a, b in zip(left_edge, values, strict=True)]
        for y, r in enumerate(rows):
            ax.text(1.01, y, f"n={r['judged']}, unparsable {r['unparsable']}", va="center", fontsize=7)
        ax.set_xlim(0, 1.45)
        ax.invert_yaxis()
        ax.set_title(f"{LABELS[c]} vs normal", loc="left")
        ax.set_xlabel("share of judged pairs")
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
    fig.suptitle("Win / tie / lose by category (both orders must agree)")
    return _save(plt, fig, out_dir, "win_tie_lose.png")


def _net_win_rate_chart(plt: Any, summary: dict[str, Any], overall_quality: dict[str, Any], out_dir: Path) -> str:
    categories = categories_of(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(categories) + 2), 4.0))
    names = [*categories, "overall"]
    width = 0.8 / len(overall_quality)
    for i, (c, data) in enumerate(overall_quality.items()):
        values = [figures(data, n).get("net_win_rate") for n in names]
        xs = bar_positions(i, len(overall_quality), len(names), width)
        ax.bar(xs, [v or 0.0 for v in values], width, color=COLORS[c], label=LABELS[c])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("net win rate (win − lose)")
    ax.set_title("Net win rate against normal decoding, by category")
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir, "net_win_rate.png")


def _llmzoo_chart(plt: Any, summary: dict[str, Any], metrics: list[str], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    candidates = [c for c in CANDIDATE_MODES if any(c in summary["quality"][m] for m in metrics)]
    width = 0.8 / max(1, len(candidates))
    for i, c in enumerate(candidates):
        values = [summary["quality"][m].get(c, {}).get("overall", {}).get("net_win_rate") for m in metrics]
        xs = bar_positions(i, len(candidates), len(metrics), width)
        ax.bar(xs, [v or 0.0 for v in values], width, color=COLORS[c], label=LABELS[c])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("net win rate")
    ax.set_title("LLMZoo metrics: net win rate against normal decoding")
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir, "llmzoo_net_win_rate.png")


def _router_matrix(ax: Any, overall: dict[str, Any]) -> None:
    matrix = [[overall["true_sot"], overall["false_normal"]], [overall["false_sot"], overall["true_normal"]]]
    ax.imshow(matrix, cmap="Blues")
    darkest = max(max(row) for row in matrix) or 1
    for y in range(2):
        for x in range(2):
            color = "white" if matrix[y][x] > darkest / 2 else "black"  # readable on dark cells
            ax.text(x, y, str(matrix[y][x]), ha="center", va="center", fontsize=12, color=color)
    ax.set_xticks([0, 1], ["routed SoT", "routed normal"])
    ax.set_yticks([0, 1], ["suitable", "unsuitable"])
    ax.set_title(f"Router vs labels (agreement {_pct(overall['accuracy'])})")


def _router_bars(ax: Any, by_category: dict[str, dict[str, Any]]) -> None:
    names = list(by_category)
    suitable = [by_category[n]["true_sot"] + by_category[n]["false_normal"] for n in names]
    to_sot = [
        by_category[n]["true_sot"] + by_category[n]["false_sot"] + by_category[n]["unlabelled_sot"] for n in names
    ]
    sizes = [
        by_category[n]["labelled"] + by_category[n]["unlabelled_sot"] + by_category[n]["unlabelled_normal"]
        for n in names
    ]
    slots = range(len(names))
    ax.bar(
        [x - 0.2 for x in slots],
        [s / n if n else 0 for s, n in zip(suitable, sizes, strict=True)],
        0.4,
        color="#9467bd",
        label="labelled suitable",
    )
    ax.bar(
        [x + 0.2 for x in slots],
        [s / n if n else 0 for s, n in zip(to_sot, sizes, strict=True)],
        0.4,
        color=COLORS["sot"],
        label="routed to SoT",
    )
    ax.set_xticks(list(slots), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of the category's questions")
    ax.set_title("By category")
    ax.legend(fontsize=8)


def _router_chart(plt: Any, router: dict[str, Any], out_dir: Path) -> str:
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(10.0, 0.9 * len(router["by_category"]) + 5), 4.0), gridspec_kw={"width_ratios": [1, 2]}
    )
    _router_matrix(left, router["overall"])
    _router_bars(right, router["by_category"])
    return _save(plt, fig, out_dir, "router.png")


def draw_charts(summary: dict[str, Any], answers: RecordFile[AnswerRecord], out_dir: Path) -> dict[str, str]:
    """PNG charts into `out_dir`; returns {chart: file name}. Needs matplotlib."""
    plt = _pyplot()
    charts: dict[str, str] = {}
    if summary["speedup"]:
        charts["speedup"] = _speedup_chart(plt, summary, out_dir)
    ok = [r for r in answers.ok if r.result is not None]
    if ok:
        charts["latency"] = _latency_chart(plt, summary, ok, out_dir)
    overall_quality = summary["quality"].get(OVERALL, {})
    if overall_quality:
        charts["win_tie_lose"] = _win_tie_lose_chart(plt, summary, overall_quality, out_dir)
        charts["net_win_rate"] = _net_win_rate_chart(plt, summary, overall_quality, out_dir)
    metrics = [m for m in LLMZOO_METRICS if m in summary["quality"]]
    if metrics:
        charts["llmzoo"] = _llmzoo_chart(plt, summary, metrics, out_dir)
    router = summary.get("router")
    if router:
        charts["router"] = _router_chart(plt, router, out_dir)
    return charts
