"""`sot router train | eval`: fit the packaged SoT-R classifier, and score any router against labelled questions.

Thin views: training is `sot.router.trained.train_model`, the arithmetic is `sot.router.metrics`; these
commands read options, print rich tables (or `--json`) and write the artefact. They compute nothing
themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sot.backends.base import Message
from sot.cli.options import backend_options, build_backend, handle_errors
from sot.errors import ConfigError
from sot.router import ROUTERS, Router, make_router
from sot.router.metrics import Confusion, RouterMetrics, compute_metrics
from sot.router.trained import packaged_model_path, save_model, train_model

DEFAULT_TRAINING_DATA = Path("../shared/data/lima_router.jsonl")
# Where a skeleton is plainly wrong: the false-SoT rate on these is the number to keep near zero.
NO_SOT_CATEGORIES = ("coding", "math", "fermi")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@click.group("router")
def router() -> None:
    """SoT-R routers: train the packaged classifier, or score a router against labelled questions."""


@router.command("train")
@click.argument("dataset", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_TRAINING_DATA)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the model (default: the packaged src/sot/router/trained_router.json).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cross-validation splits.")
@click.option(
    "--min-precision",
    type=click.FloatRange(0.0, 1.0),
    default=0.75,
    show_default=True,
    help="The threshold is the lowest whose cross-validated precision reaches this.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
@handle_errors
def train(dataset: Path, output: Path | None, seed: int, min_precision: float, as_json: bool) -> None:
    """Train the router on DATASET (JSONL: question, sot_suitable; default ../shared/data/lima_router.jsonl).

    Deterministic for a dataset, seed and scikit-learn version. Needs scikit-learn (a dev dependency);
    the model it writes does not.
    """
    err = Console(stderr=True)
    model = train_model(
        dataset,
        seed=seed,
        min_precision=min_precision,
        progress=None if as_json else lambda msg: err.print(f"[dim]{msg}[/dim]"),
    )
    out = save_model(model, output or packaged_model_path())
    summary = {"output": str(out), "bytes": out.stat().st_size, "threshold": model.threshold, **model.training}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    cv = model.training["cv_at_threshold"]
    table = Table(title=f"Cross-validated on {model.training['dataset']} ({model.training['examples']} questions)")
    for column in ("C", "ROC AUC", "threshold", "accuracy", "precision", "recall", "false-SoT rate"):
        table.add_column(column, justify="right")
    for c, auc in model.training["cv_auc_by_C"].items():
        chosen = float(c) == model.training["C"]
        cells = [f"{model.threshold:.2f}", *(_pct(cv[k]) for k in ("accuracy", "precision", "recall"))]
        cells.append(_pct(cv["false_sot_rate"]))
        table.add_row(c, f"{auc:.3f}", *(cells if chosen else [""] * 5), style="bold" if chosen else None)
    console.print(table)
    console.print(
        f"wrote {out} ({summary['bytes'] / 1024:.0f} kB, {model.training['vocabulary_size']} terms, "
        f"dataset sha256 {model.training['dataset_sha256'][:12]}…)"
    )


def _confusion_row(name: str, c: Confusion) -> list[str]:
    rates = (c.accuracy, c.precision, c.recall, c.false_sot_rate)
    return [name, str(c.n), *(_pct(r) for r in rates), f"{c.tp}/{c.fp}/{c.fn}/{c.tn}"]


def _metrics_table(title: str, metrics: RouterMetrics, hard: list[str]) -> Table:
    table = Table(title=title)
    table.add_column("category", no_wrap=True)
    for column in ("n", "acc", "prec", "recall", "false-SoT", "TP/FP/FN/TN"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, c in metrics.by_category.items():
        table.add_row(*_confusion_row(name, c), style="yellow" if name in hard and c.fp else None)
    if hard:
        table.add_section()
        table.add_row(*_confusion_row("+".join(hard), metrics.subset(hard)), style="italic")
    table.add_section()
    table.add_row(*_confusion_row("overall", metrics.overall), style="bold")
    return table


def _matrix_table(c: Confusion) -> Table:
    table = Table(title="overall confusion matrix")
    table.add_column("label \\ decision")
    table.add_column("normal", justify="right")
    table.add_column("sot", justify="right")
    table.add_row("normal", str(c.tn), str(c.fp))
    table.add_row("sot", str(c.fn), str(c.tp))
    return table


async def _decide_all(chosen: Router, questions: list[str], concurrency: int) -> list[tuple[bool, str, float]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> tuple[bool, str, float]:
        async with gate:
            start = time.perf_counter()
            decision = await chosen.decide([Message(role="user", content=text)])
            return decision.use_sot, decision.reason, time.perf_counter() - start

    return await asyncio.gather(*(one(q) for q in questions))


@router.command("eval")
@click.argument("dataset", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--router",
    "router_name",
    type=click.Choice(ROUTERS, case_sensitive=False),
    default="trained",
    show_default=True,
    help="Which router to score.",
)
@click.option(
    "--model-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trained router: a model file instead of the packaged one.",
)
@click.option(
    "--prompt",
    "prompt_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prompting router: a prompt file (JSON with 'prompt', e.g. the paper's, or text with {request}).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Prompting router: routing calls at once.",
)
@click.option("--errors", "show_errors", is_flag=True, help="List the misrouted questions.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@backend_options
@handle_errors
def evaluate(
    dataset: Path,
    router_name: str,
    model_file: Path | None,
    prompt_path: Path | None,
    concurrency: int,
    show_errors: bool,
    as_json: bool,
    **params: Any,
) -> None:
    """Score a router on DATASET (JSONL: question, sot_suitable, optional category).

    Reports accuracy, precision, recall and the false-SoT rate (normal-labelled questions given a
    skeleton), overall and per category, with the confusion matrix. The prompting router asks the
    backend chosen by --backend/--model/--base-url/--api-key.
    """
    from sot.eval.dataset import DEFAULT_CATEGORY, load_dataset

    rows = [q for q in load_dataset(dataset) if q.sot_suitable is not None]
    if not rows:
        raise ConfigError(f"{dataset}: no question has a 'sot_suitable' label")
    name = router_name.lower()
    err = Console(stderr=True)

    async def run() -> list[tuple[bool, str, float]]:
        backend = None
        if name == "prompting":
            backend = build_backend(params, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
        try:
            chosen = make_router(name, backend=backend, model_path=model_file, prompt_path=prompt_path)
            return await _decide_all(chosen, [q.question for q in rows], concurrency)
        finally:
            if backend is not None:
                await backend.aclose()

    results = asyncio.run(run())
    labels = [bool(q.sot_suitable) for q in rows]
    predictions = [use for use, _, _ in results]
    has_categories = any(q.category != DEFAULT_CATEGORY for q in rows)
    metrics = compute_metrics(labels, predictions, [q.category for q in rows] if has_categories else None)
    hard = [c for c in NO_SOT_CATEGORIES if c in metrics.by_category]
    seconds = sorted(s for _, _, s in results)
    errors = [
        {"id": q.id, "category": q.category, "label": q.sot_suitable, "reason": reason}
        for q, (use, reason, _) in zip(rows, results, strict=True)
        if use != q.sot_suitable
    ]
    if as_json:
        payload: dict[str, Any] = {
            "dataset": str(dataset),
            "router": name,
            **metrics.to_dict(),
            "mean_decision_ms": round(1000 * sum(seconds) / len(seconds), 3),
        }
        if hard:
            payload["no_sot_categories"] = {"categories": hard, **metrics.subset(hard).to_dict()}
        if show_errors:
            payload["errors"] = errors
        click.echo(json.dumps(payload, indent=2))
        return

    console = Console()
    console.print(_metrics_table(f"{name} router on {dataset.name}", metrics, hard))
    console.print(_matrix_table(metrics.overall))
    median_ms = 1000 * seconds[len(seconds) // 2]
    console.print(
        f"majority-class baseline {_pct(metrics.majority_baseline)}; "
        f"median decision {median_ms:.2f} ms, slowest {1000 * seconds[-1]:.2f} ms"
    )
    if show_errors:
        for e in errors:
            want = "sot" if e["label"] else "normal"
            console.print(f"[red]{e['id']}[/red] ({e['category']}, label {want}): {e['reason']}", highlight=False)
