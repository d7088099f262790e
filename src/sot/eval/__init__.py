"""Evaluation: run a dataset in several modes, judge SoT against normal answers, report speed and quality.

`dataset` loads questions and `datasets` fetches the named ones (vicuna80, lima), `runner` answers them
(resumably), `judge` asks an LLM judge, `metrics`, `equal_length` and `spread` hold the arithmetic,
`summary` computes every figure and `report` writes Markdown (`report_markdown`), charts (`report_charts`)
and JSON. The CLI is `sot.cli.eval_cmd`.
"""

from sot.eval.dataset import DatasetError, Question, load_dataset
from sot.eval.datasets import open_dataset
from sot.eval.judge import DEFAULT_PROMPTS, Judge, JudgeSettings, load_judge_prompts, parse_scores, run_judging
from sot.eval.records import AnswerRecord, JudgementRecord, load_records
from sot.eval.report import summarize, write_report
from sot.eval.runner import parse_modes, run_answers

__all__ = [
    "DEFAULT_PROMPTS",
    "AnswerRecord",
    "DatasetError",
    "Judge",
    "JudgeSettings",
    "JudgementRecord",
    "Question",
    "load_dataset",
    "load_judge_prompts",
    "load_records",
    "open_dataset",
    "parse_modes",
    "parse_scores",
    "run_answers",
    "run_judging",
    "summarize",
    "write_report",
]
