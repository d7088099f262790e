"""`sot eval run | judge | report`: measure whether SoT pays off on your model and questions (thin CLI views).

The work lives in `sot.eval`; these commands parse options, build the backend, show a progress bar and
print a summary. They do not compute any figure themselves.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sot.backends import Backend
from sot.cli.options import backend_options, build_backend, build_engine, generation_options, handle_errors
from sot.engine import Engine
from sot.errors import ConfigError
from sot.eval.dataset import Question, select
from sot.eval.datasets import dataset_stem, open_dataset
from sot.eval.judge import LLMZOO_METRICS, OVERALL, Judge, JudgeSettings, load_judge_prompts, run_judging
from sot.eval.records import AnswerRecord, load_records
from sot.eval.report import headline, write_report
from sot.eval.runner import parse_modes, run_answers
from sot.events import Mode

RESULTS_SUFFIX = ".results.jsonl"


def _base_name(results: Path) -> str:
    name = results.name
    return name[: -len(RESULTS_SUFFIX)] if name.endswith(RESULTS_SUFFIX) else results.stem


def default_judgements_path(results: Path) -> Path:
    """`x.results.jsonl` -> `x.judgements.jsonl`, next to it."""
    return results.with_name(_base_name(results) + ".judgements.jsonl")


def default_report_dir(results: Path) -> Path:
    """`x.results.jsonl` -> `x-report/`, next to it."""
    return results.with_name(_base_name(results) + "-report")


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _run_resumable(
    err: Console,
    output: Path,
    backend: Backend,
    *,
    label: str,
    unit: str,
    saved: str,
    describe: Callable[[Any], str],
    work: Callable[[Callable[[int, int], None], Callable[[Any], None]], Awaitable[Any]],
) -> Any:
    """Run a resumable stage (answering or judging) under a progress bar; closes the backend.

    `work(on_plan, on_record)` does the stage; records are saved as they come, so an interrupt loses
    nothing and the same command resumes.
    """

    async def main() -> Any:
        with _progress(err) as progress:
            task = progress.add_task(label, total=None, failed=0)
            failed = 0

            def on_plan(total: int, done: int) -> None:
                progress.update(task, total=total, completed=done)
                if done:
                    err.print(f"resuming: {done} of {total} {unit} already in {output}")

            def on_record(record: Any) -> None:
                nonlocal failed
                failed += not record.ok
                progress.update(task, advance=1, failed=failed, description=describe(record))

            try:
                return await work(on_plan, on_record)
            finally:
                await backend.aclose()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        err.print(f"interrupted: finished {saved} are saved in {output}; run the same command to resume")
        raise


@click.group(name="eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Does SoT pay off, and where? Answer a dataset in several modes, judge the answers, report by category.

    \b
    sot eval run [DATASET] --modes normal,sot,auto         answers -> DATASET.results.jsonl (resumable)
    sot eval judge DATASET.results.jsonl                   judge SoT / SoT-R against normal answers
    sot eval report DATASET.results.jsonl                  report.md, charts and summary.json
    """


# -- run -------------------------------------------------------------------------------------------------


def _questions(
    dataset: str,
    ids: str | None,
    categories: str | None,
    limit: int | None,
    per_category: int | None,
    suitable_only: bool,
) -> list[Question]:
    """The dataset's questions (named or a file) after the command's filters; an error when none is left."""
    questions = select(
        open_dataset(dataset),
        ids=_split(ids),
        categories=_split(categories),
        limit=limit,
        per_category=per_category,
        suitable_only=suitable_only,
    )
    if not questions:
        raise ConfigError("no questions left after --ids / --categories / --suitable-only / --limit")
    return questions


@eval_group.command("run")
@click.argument("dataset", default="vicuna80", required=False)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Results file, appended to as answers complete (default: ./<dataset>.results.jsonl).",
)
@click.option(
    "--modes",
    default="normal,sot",
    show_default=True,
    help="Comma-separated modes to answer every question in: normal, sot, auto (SoT-R: a router decides).",
)
@click.option(
    "--router", "router_name", default=None, help="Router for the auto mode: trained (default), heuristic, prompting."
)
@click.option(
    "--concurrency",
    "-j",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Answers in flight at once. Concurrent answers share the machine and distort latency: keep 1-2 on "
    "the local backend; API endpoints tolerate more.",
)
@click.option("--limit", type=click.IntRange(1), help="Only the first N questions (after the other filters).")
@click.option("--per-category", type=click.IntRange(1), help="Only the first N questions of each category.")
@click.option("--ids", help="Only these question ids (comma-separated).")
@click.option("--categories", help="Only these categories (comma-separated).")
@click.option(
    "--suitable-only", is_flag=True, help="Leave out the questions labelled unsuitable for SoT (as `sot bench` does)."
)
@click.option("--answer-timeout", type=click.FloatRange(0.1), help="Seconds allowed per answer (a failure after).")
@click.option("--warmup/--no-warmup", default=True, show_default=True, help="Load the model before timing.")
@backend_options
@generation_options
@handle_errors
def run_cmd(
    dataset: str,
    output: Path | None,
    modes: str,
    router_name: str | None,
    concurrency: int,
    limit: int | None,
    per_category: int | None,
    ids: str | None,
    categories: str | None,
    suitable_only: bool,
    answer_timeout: float | None,
    warmup: bool,
    **params: Any,
) -> None:
    """Answer every question of DATASET in every mode, appending one record per answer.

    DATASET is a JSONL file or a named dataset (vicuna80, the default, or lima), fetched once into the
    user's cache. Run the same command again to resume: answers already in the results file are skipped,
    failed ones are retried.
    """
    chosen_modes = parse_modes(modes)
    questions = _questions(dataset, ids, categories, limit, per_category, suitable_only)
    output = output or Path.cwd() / (dataset_stem(dataset) + RESULTS_SUFFIX)
    err = Console(stderr=True, soft_wrap=True)
    engine = _answering_engine(err, params, chosen_modes, router_name)
    backend = engine.backend
    err.print(
        f"{len(questions)} question(s) x {len(chosen_modes)} mode(s) on {backend.name}/{backend.model}, "
        f"{concurrency} at a time -> {output}"
    )

    summary = _run_resumable(
        err,
        output,
        backend,
        label="answering",
        unit="answer(s)",
        saved="answers",
        describe=lambda record: f"{record.question_id}/{record.mode}",
        work=lambda on_plan, on_record: run_answers(
            engine,
            questions,
            chosen_modes,
            output,
            concurrency=concurrency,
            answer_timeout=answer_timeout,
            warmup=warmup,
            on_plan=on_plan,
            on_record=on_record,
        ),
    )
    err.print(
        f"{summary.answered} answered, {len(summary.failed)} failed, {summary.already_done} already done "
        f"({summary.truncated} truncated, {summary.fallbacks} fell back to normal) in {summary.seconds:.0f} s"
    )
    _exit_on_failures(err, summary.failed, summary.failure_lines(), "answer(s)")


def _answering_engine(err: Console, params: dict[str, Any], modes: list[Mode], router_name: str | None) -> Engine:
    """The engine that answers in `modes`: the backend of `params`, with a router when `auto` is one of them."""
    backend = build_backend(params, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    router = None
    if "auto" in modes:
        from sot.router import make_router

        router = make_router(router_name or "trained", backend=backend)
    return build_engine(backend, params, router=router)


def _exit_on_failures(err: Console, failed: list[Any], lines: list[str], unit: str) -> None:
    """List the failures of a stage by kind and exit 1 (a rerun retries them); nothing when none failed."""
    if failed:
        err.print(f"[red]{len(failed)} {unit} failed[/red] (run again to retry them):")
        for line in lines:
            err.print(f"  {line}", highlight=False, markup=False)
        sys.exit(1)


# -- judge -----------------------------------------------------------------------------------------------


def parse_criteria(text: str) -> list[str]:
    """`overall`, `llmzoo` (the five LLMZoo metrics), `all`, or a comma-separated list of criteria."""
    criteria: list[str] = []
    for item in _split(text.lower()):
        expanded = {"all": [OVERALL, *LLMZOO_METRICS], "llmzoo": list(LLMZOO_METRICS)}.get(item, [item])
        for criterion in expanded:
            if criterion != OVERALL and criterion not in LLMZOO_METRICS:
                raise ConfigError(
                    f"unknown criterion {criterion!r}; use overall, llmzoo, all or one of {', '.join(LLMZOO_METRICS)}"
                )
            if criterion not in criteria:
                criteria.append(criterion)
    if not criteria:
        raise ConfigError("no criteria given")
    return criteria


@eval_group.command("judge")
@click.argument("results", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Judgements file, appended to (default: <results>.judgements.jsonl next to RESULTS).",
)
@click.option(
    "--judge-prompts",
    default="default",
    show_default=True,
    help="Judge prompts: 'default' (the package's own) or a FastChat-format JSONL file, e.g. "
    "../shared/reference/fastchat_judge_prompts.jsonl for a reproducible comparison.",
)
@click.option(
    "--criteria",
    default=OVERALL,
    show_default=True,
    help="overall (FastChat-style pairwise score), llmzoo (relevance, diversity, coherence, immersion, "
    "integrity), all, or a comma-separated list.",
)
@click.option("--candidates", default="sot,auto", show_default=True, help="Modes judged against normal answers.")
@click.option("--concurrency", "-j", type=click.IntRange(1, 256), default=4, show_default=True, help="Pairs at once.")
@click.option(
    "--max-tokens",
    "judge_max_tokens",
    type=click.IntRange(1, 8192),
    default=16,
    show_default=True,
    help="Judge token budget when the scores come on the first line (the explanation is not needed).",
)
@click.option(
    "--long-max-tokens",
    type=click.IntRange(1, 32768),
    default=512,
    show_default=True,
    help="Judge token budget for prompts that put the scores at the end (FastChat's math prompt).",
)
@click.option("--temperature", "judge_temperature", type=click.FloatRange(0.0, 2.0), default=0.0, show_default=True)
@click.option("--seed", "judge_seed", type=int, help="Judge sampling seed.")
@backend_options
@handle_errors
def judge_cmd(
    results: Path,
    output: Path | None,
    judge_prompts: str,
    criteria: str,
    candidates: str,
    concurrency: int,
    judge_max_tokens: int,
    long_max_tokens: int,
    judge_temperature: float,
    judge_seed: int | None,
    **params: Any,
) -> None:
    """Judge SoT (and SoT-R) answers in RESULTS against the normal answers, each pair in both orders.

    The judge is any backend (--backend/--model/...): the embedded model works offline, a strong API model
    gives meaningful verdicts. Unparsable replies are recorded as such. Rerun to resume.
    """
    chosen_criteria = parse_criteria(criteria)
    chosen_candidates: list[Mode] = [m for m in parse_modes(candidates) if m != "normal"]
    prompts = load_judge_prompts(judge_prompts)
    answers = load_records(results, AnswerRecord)
    output = output or default_judgements_path(results)
    err = Console(stderr=True, soft_wrap=True)
    backend = build_backend(params, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    judge = Judge(
        backend,
        prompts,
        JudgeSettings(
            max_tokens=judge_max_tokens,
            long_max_tokens=long_max_tokens,
            temperature=judge_temperature,
            seed=judge_seed,
        ),
    )
    err.print(f"judge {backend.name}/{backend.model}, prompts {prompts.name}, criteria {', '.join(chosen_criteria)}")

    summary = _run_resumable(
        err,
        output,
        backend,
        label="judging",
        unit="pair(s)",
        saved="judgements",
        describe=lambda record: f"{record.question_id}/{record.candidate}/{record.criterion}",
        work=lambda on_plan, on_record: run_judging(
            judge,
            answers,
            output,
            candidates=chosen_candidates,
            criteria=chosen_criteria,
            concurrency=concurrency,
            on_plan=on_plan,
            on_record=on_record,
        ),
    )
    _judging_done(err, summary, output)


def _judging_done(err: Console, summary: Any, output: Path) -> None:
    """What a judging run did, the pairs it skipped, and exit 1 when judgements failed."""
    err.print(
        f"{summary.judged} pair(s) judged ({summary.unparsable} unparsable, {summary.identical} identical), "
        f"{len(summary.failed)} failed, {summary.already_done} already done, in {summary.seconds:.0f} s -> {output}"
    )
    if summary.missing:
        shown = ", ".join(f"{q}/{m}" for q, m in summary.missing[:8])
        err.print(f"[yellow]{len(summary.missing)} pair(s) lack a successful answer and were skipped[/yellow]: {shown}")
    _exit_on_failures(err, summary.failed, summary.failure_lines(), "judgement(s)")


# -- report ----------------------------------------------------------------------------------------------


@eval_group.command("report")
@click.argument("results", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--judgements",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Judgements file (default: <results>.judgements.jsonl next to RESULTS, when it exists).",
)
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where report.md, summary.json and the charts go (default: <results>-report/ next to RESULTS).",
)
@click.option("--title", help="Report title.")
@click.option(
    "--note", "notes", multiple=True, help="A paragraph to put under the title (repeatable), e.g. how to reproduce."
)
@click.option("--charts/--no-charts", default=True, show_default=True, help="Draw PNG charts (needs matplotlib).")
@handle_errors
def report_cmd(
    results: Path,
    judgements: Path | None,
    output_dir: Path | None,
    title: str | None,
    notes: tuple[str, ...],
    charts: bool,
) -> None:
    """Write a Markdown report, PNG charts and summary.json from RESULTS (and its judgements)."""
    if judgements is None and default_judgements_path(results).exists():
        judgements = default_judgements_path(results)
    files = write_report(
        results,
        output_dir or default_report_dir(results),
        judgements=judgements,
        title=title,
        notes=notes,
        charts=charts,
    )
    for line in headline(files.figures):
        click.echo(line)
    click.echo(f"wrote {files.markdown}, {files.summary.name} and {len(files.charts)} chart(s)", err=True)
