"""`sot eval report`: turn a results file (and a judgements file) into summary.json, report.md and PNG charts.

Every number comes from `summarize` (`sot.eval.summary`), a pure function of the records; the Markdown
(`sot.eval.report_markdown`) and the charts (`sot.eval.report_charts`) only format what it returns, and
summary.json is that same dict, so machines and people read the same figures. It runs no model. Charts
need matplotlib (the `eval` extra) and are drawn with the Agg backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sot.errors import ConfigError
from sot.eval.records import AnswerRecord, JudgementRecord, load_records
from sot.eval.report_charts import draw_charts
from sot.eval.report_markdown import headline, render_markdown
from sot.eval.summary import CANDIDATE_MODES, LABELS, summarize

__all__ = [
    "CANDIDATE_MODES",
    "LABELS",
    "ReportFiles",
    "draw_charts",
    "headline",
    "render_markdown",
    "summarize",
    "write_report",
]


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
