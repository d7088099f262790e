"""Rich tables of a latency benchmark: one row per question and repeat, and the summary with its intervals."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from sot.bench.latency import QuestionTiming, Summary
from sot.eval.spread import Interval


def _fmt(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}{suffix}"


def _with_interval(value: float | None, interval: Interval | None, suffix: str = "x") -> str:
    """ "2.13x [1.95, 2.31]": the figure and its 95% interval, when there is one."""
    if value is None:
        return "–"
    if interval is None:
        return _fmt(value, suffix)
    return f"{value:.2f}{suffix} [{interval.low:.2f}, {interval.high:.2f}]"


def rows_table(rows: Sequence[QuestionTiming]) -> Table:
    """Per-question table (one row per question and repeat)."""
    repeated = any(r.repeat for r in rows)
    table = Table(title="normal vs SoT, per question", header_style="bold")
    columns = ["id", *(["rep"] if repeated else []), "category", "normal s", "SoT s", "speed-up"]
    columns += ["par. eff.", "eq.-len", "tokens n/SoT", "pts"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("id", "category") else "right")
    for r in rows:
        tokens = f"{r.normal_tokens}{'*' if r.normal_capped else ''}/{r.sot_tokens}{'*' if r.sot_capped else ''}"
        equal = "short" if r.equal_length_speedup is None else _fmt(r.equal_length_speedup, "x")
        cells = [r.id, *([f"{r.repeat + 1}{'n' if r.normal_first else 's'}"] if repeated else []), r.category]
        cells += [_fmt(r.normal_seconds), _fmt(r.sot_seconds), _fmt(r.speedup, "x"), _fmt(r.parallel_efficiency)]
        cells += [equal, tokens, str(r.points) if not r.sot_fallback else "fb"]
        table.add_row(*cells)
    table.caption = (
        "* hit the token cap · fb: SoT fell back to normal decoding · eq.-len: equal-length speed-up "
        "(short: the normal answer is shorter than SoT's, not compared)"
        + (" · rep: repeat, n/s: normal/SoT ran first" if repeated else "")
    )
    return table


def _speed_lines(s: Summary) -> list[tuple[str, str]]:
    iv = s.interval
    runs = f"{s.runs} runs of {s.questions} questions" if s.repeats > 1 else f"{s.questions} questions"
    finished = f"{s.finished_runs} runs" if s.repeats > 1 else f"{s.finished_questions}"
    return [
        ("questions" + (f" x {s.repeats} repeats" if s.repeats > 1 else ""), runs),
        ("speed-up, geometric mean (all)", _with_interval(s.speedup_geomean, iv("speedup_geomean"))),
        ("speed-up, median (all)", _with_interval(s.speedup_median, iv("speedup_median"))),
        (
            f"speed-up, geometric mean (both ended on their own: {finished})",
            _with_interval(s.finished_speedup_geomean, iv("finished_speedup_geomean")),
        ),
        (
            "speed-up, median (both ended on their own)",
            _with_interval(s.finished_speedup_median, iv("finished_speedup_median")),
        ),
        (
            "equal-length speed-up, geometric mean",
            _with_interval(s.equal_length_speedup_geomean, iv("equal_length_speedup_geomean")),
        ),
        (
            "equal-length speed-up, median",
            _with_interval(s.equal_length_speedup_median, iv("equal_length_speedup_median")),
        ),
        (
            "equal-length: compared / normal answer shorter than SoT's",
            f"{s.equal_length_compared} / {s.equal_length_too_short}",
        ),
        (
            "parallel efficiency, median",
            _with_interval(s.parallel_efficiency_median, iv("parallel_efficiency_median"), ""),
        ),
    ]


def _cost_lines(s: Summary) -> list[tuple[str, str]]:
    lines = [
        ("answers at the token cap (normal / SoT)", f"{s.normal_capped} / {s.sot_capped}"),
        ("SoT fallbacks to normal", str(s.sot_fallbacks)),
        ("mean answer tokens (normal / SoT)", f"{s.mean_normal_tokens:.0f} / {s.mean_sot_tokens:.0f}"),
    ]
    if s.computed_prompt_tokens is not None and s.prompt_tokens:
        saved = 1 - s.computed_prompt_tokens / s.prompt_tokens
        lines.append(
            (
                "SoT prompt tokens computed / without reuse",
                f"{s.computed_prompt_tokens} / {s.prompt_tokens} ({saved:.0%} saved)",
            )
        )
    if s.sot_decode_steps_mean is not None and s.sot_sequences_per_step is not None:
        lines.append(
            (
                "SoT decode steps per answer, sequences per step",
                f"{s.sot_decode_steps_mean:.0f}, {s.sot_sequences_per_step:.2f}",
            )
        )
    return lines


def summary_table(summary: Summary, extra: dict[str, str] | None = None) -> Table:
    """Totals table; a speed-up's brackets hold its 95% bootstrap interval over questions (and repeats)."""
    table = Table(title="overall", show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in [*_speed_lines(summary), *_cost_lines(summary), *(extra or {}).items()]:
        table.add_row(key, value)
    level = summary.bootstrap.get("level", 0.95)
    table.caption = (
        f"\\[a, b]: {level:.0%} bootstrap interval over questions and repeats "
        f"({summary.bootstrap.get('resamples')} resamples, seed {summary.bootstrap.get('seed')})"
    )
    return table
