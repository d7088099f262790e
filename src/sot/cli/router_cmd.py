"""`sot router train | eval`: fit the packaged SoT-R model, score any router, or evaluate across datasets.

Thin views: training is `sot.router.training`, cross-dataset runs are `sot.router.crosseval`, the
arithmetic is `sot.router.metrics`; these commands read options, print rich tables (or `--json`) and
write the artefact. They compute nothing themselves.
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

from sot.cli.options import backend_options, build_backend, handle_errors
from sot.errors import ConfigError
from sot.router import ROUTERS, Router, make_router
from sot.router.crosseval import NO_SOT_CATEGORIES, cross_evaluate
from sot.router.data import Example, load_examples, own_data_dir
from sot.router.metrics import Confusion, RouterMetrics, compute_metrics, wilson_interval

SHARED_DATA = Path("../shared/data")
LIMA = SHARED_DATA / "lima_router.jsonl"
VICUNA = SHARED_DATA / "vicuna80.jsonl"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]"


def _dim(console: Console) -> Any:
    return lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False)


@click.group("router")
def router() -> None:
    """SoT-R routers: train the packaged model, score a router on labelled questions, or cross-evaluate."""


@router.command("train")
@click.argument("datasets", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the model (default: the packaged src/sot/router/trained_router.json).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cross-validation splits.")
@click.option(
    "--target-false-sot",
    type=click.FloatRange(0.0, 1.0),
    default=0.08,
    show_default=True,
    help="The threshold is the lowest whose cross-validated false-SoT rate is at most this.",
)
@click.option("--layers", type=click.IntRange(1, 30), default=1, show_default=True, help="Read a state of block N-1.")
@click.option(
    "--stage",
    type=click.Choice(["attn_norm", "ffn_inp", "l_out"]),
    default="attn_norm",
    show_default=True,
    help="Which hidden state of that block: its normalised input, after attention, or its output.",
)
@click.option("--words-only", is_flag=True, help="Train the word head only (no embedding model needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
@handle_errors
def train(
    datasets: tuple[Path, ...],
    output: Path | None,
    seed: int,
    target_false_sot: float,
    layers: int,
    stage: str,
    words_only: bool,
    as_json: bool,
) -> None:
    """Train the router on DATASETS (JSONL files or directories; default: ../shared/data/lima_router.jsonl
    and the packaged sot/router/data).

    Deterministic for the data, seed, scikit-learn version and CPU. Needs scikit-learn (pip install
    'sot[train]') and, unless --words-only, the embedded model; the model it writes needs neither.
    """
    from sot.router.embeddings import PACKAGED, EmbeddingSpec
    from sot.router.trained import packaged_model_path, save_model
    from sot.router.training import Recipe, train_model

    paths = list(datasets) or [LIMA, own_data_dir()]
    if not datasets and not LIMA.is_file():
        raise ConfigError(f"{LIMA} is not here: pass the training data paths")
    err = Console(stderr=True)
    model = train_model(
        paths,
        recipe=Recipe(seed=seed, target_false_sot=target_false_sot),
        spec=None if words_only else _spec(EmbeddingSpec(layers=layers, stage=stage), PACKAGED),
        progress=None if as_json else _dim(err),
    )
    out = save_model(model, output or packaged_model_path())
    summary = {"output": str(out), "bytes": out.stat().st_size, **model.training}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    table = Table(title=f"Cross-validated on {model.training['examples']} examples (training data only)")
    for column in ("head", "C", "s", "ROC AUC", "threshold", "accuracy", "precision", "recall", "false-SoT"):
        table.add_column(column, justify="right")
    for head_name, head in (("combined", model.combined), ("words", model.words)):
        info = model.training.get(head_name)
        if head is None or info is None:
            continue
        cv = info["cv_at_threshold"]
        scale = info["embed_scale"]
        key = f"C={info['C']:g}" + ("" if scale is None else f",s={scale:g}")
        cells = [_pct(cv[k]) for k in ("accuracy", "precision", "recall", "false_sot_rate")]
        table.add_row(
            head_name,
            f"{info['C']:g}",
            "" if scale is None else f"{scale:g}",
            f"{info['cv_auc'][key]:.3f}",
            f"{head.threshold:.2f}",
            *cells,
        )
    console.print(table)
    console.print(f"wrote {out} ({summary['bytes'] / 1024:.0f} kB, {model.training['vocabulary_size']} terms)")


def _spec(spec: Any, packaged: str) -> Any:
    """Graph-path states are computed with re-encoded weights (BF16 or F16), the first block's input as stored."""
    from dataclasses import replace

    return (
        spec if spec.reads_tokens_only else replace(spec, weights="auto" if spec.weights == packaged else spec.weights)
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


async def _decide_all(chosen: Router, examples: list[Example], concurrency: int) -> list[tuple[bool, str, float]]:
    gate = asyncio.Semaphore(concurrency)
    prepare = getattr(chosen, "prepare", None)
    if callable(prepare):
        await asyncio.to_thread(prepare)  # load an embedding model before timing decisions

    async def one(example: Example) -> tuple[bool, str, float]:
        async with gate:
            start = time.perf_counter()
            decision = await chosen.decide(list(example.messages))
            return decision.use_sot, decision.reason, time.perf_counter() - start

    return [await one(e) for e in examples] if concurrency == 1 else await asyncio.gather(*(one(e) for e in examples))


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@router.command("eval")
@click.argument("dataset", required=False, type=click.Path(exists=True, path_type=Path))
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
@click.option("--words-only", is_flag=True, help="Trained router: word features only (no embedding model).")
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
    help="Prompting router: routing calls at once (other routers decide one at a time).",
)
@click.option(
    "--cross", is_flag=True, help="Cross-dataset evaluation: train on one source, test on another (needs scikit-learn)."
)
@click.option(
    "--lima",
    type=click.Path(exists=True, path_type=Path),
    default=LIMA,
    show_default=True,
    help="--cross: the LIMA file.",
)
@click.option(
    "--vicuna",
    type=click.Path(exists=True, path_type=Path),
    default=VICUNA,
    show_default=True,
    help="--cross: the Vicuna-80 file.",
)
@click.option("--own", type=click.Path(exists=True, path_type=Path), help="--cross: own data (default: packaged).")
@click.option("--errors", "show_errors", is_flag=True, help="List the misrouted questions.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@backend_options
@handle_errors
def evaluate(
    dataset: Path | None,
    router_name: str,
    model_file: Path | None,
    words_only: bool,
    prompt_path: Path | None,
    concurrency: int,
    cross: bool,
    lima: Path,
    vicuna: Path,
    own: Path | None,
    show_errors: bool,
    as_json: bool,
    **params: Any,
) -> None:
    """Score a router on DATASET (JSONL: question or messages, label or sot_suitable, optional category/kind),
    or with --cross train and test across LIMA, Vicuna-80 and the packaged own data.

    Reports accuracy, precision, recall and the false-SoT rate (normal-labelled questions given a
    skeleton), with 95% Wilson intervals and the majority baseline, per category, and decision latency.
    """
    if cross:
        _cross(lima, vicuna, own or own_data_dir(), words_only, as_json)
        return
    if dataset is None:
        raise ConfigError("give a DATASET to score, or --cross")
    examples = load_examples(dataset)
    if not examples:
        raise ConfigError(f"{dataset}: no labelled question")
    name = router_name.lower()
    err = Console(stderr=True)

    async def run() -> list[tuple[bool, str, float]]:
        backend = build_backend(params, progress=_dim(err)) if name == "prompting" else None
        try:
            chosen = make_router(
                name, backend=backend, model_path=model_file, prompt_path=prompt_path, words_only=words_only
            )
            return await _decide_all(chosen, examples, concurrency if name == "prompting" else 1)
        finally:
            if backend is not None:
                await backend.aclose()

    results = asyncio.run(run())
    _report(dataset, name, examples, results, show_errors, as_json)


def _report(
    dataset: Path,
    name: str,
    examples: list[Example],
    results: list[tuple[bool, str, float]],
    show_errors: bool,
    as_json: bool,
) -> None:
    labels = [e.label for e in examples]
    predictions = [use for use, _, _ in results]
    has_categories = any(e.kind for e in examples)
    metrics = compute_metrics(
        labels, predictions, [e.kind or "uncategorized" for e in examples] if has_categories else None
    )
    hard = [c for c in NO_SOT_CATEGORIES if c in metrics.by_category]
    ms = sorted(1000 * s for _, _, s in results)
    c = metrics.overall
    latency = {
        "p50_ms": round(_percentile(ms, 0.5), 3),
        "p99_ms": round(_percentile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3),
    }
    errors = [
        {"id": e.id, "category": e.kind, "label": e.label, "reason": reason}
        for e, (use, reason, _) in zip(examples, results, strict=True)
        if use != e.label
    ]
    if as_json:
        payload: dict[str, Any] = {
            "dataset": str(dataset),
            "router": name,
            **metrics.to_dict(),
            "accuracy_ci95": wilson_interval(c.tp + c.tn, c.n),
            "false_sot_ci95": wilson_interval(c.fp, c.fp + c.tn),
            "decision_latency": latency,
        }
        if hard:
            payload["no_sot_categories"] = {"categories": hard, **metrics.subset(hard).to_dict()}
        if show_errors:
            payload["errors"] = errors
        click.echo(json.dumps(payload, indent=2))
        return
    console = Console()
    console.print(_metrics_table(f"{name} router on {dataset.name}", metrics, hard))
    console.print(
        f"accuracy {_pct(c.accuracy)}{_ci(wilson_interval(c.tp + c.tn, c.n))}, false-SoT {_pct(c.false_sot_rate)}"
        f"{_ci(wilson_interval(c.fp, c.fp + c.tn))} (95% Wilson); majority-class baseline "
        f"{_pct(metrics.majority_baseline)}; decision p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms",
        highlight=False,
        soft_wrap=True,
    )
    if show_errors:
        for e in errors:
            want = "sot" if e["label"] else "normal"
            console.print(f"[red]{e['id']}[/red] ({e['category']}, label {want}): {e['reason']}", highlight=False)


def _cross(lima: Path, vicuna: Path, own: Path, words_only: bool, as_json: bool) -> None:
    from sot.router.embeddings import EmbeddingSpec

    sources = {"LIMA": load_examples(lima), "Vicuna-80": load_examples(vicuna), "own": load_examples(own)}
    err = Console(stderr=True)
    started = time.perf_counter()
    runs = cross_evaluate(
        sources, spec=None if words_only else EmbeddingSpec(), progress=None if as_json else _dim(err)
    )
    summaries = [r.summary() for r in runs]
    if as_json:
        click.echo(json.dumps({"runs": summaries, "seconds": round(time.perf_counter() - started, 1)}, indent=2))
        return
    table = Table(title="Cross-dataset: trained on one source, tested on another (95% Wilson intervals)")
    for column in (
        "train -> test",
        "head",
        "n",
        "accuracy",
        "majority",
        "precision",
        "recall",
        "false-SoT",
        "code+math+fermi to SoT",
        "targets",
    ):
        table.add_column(column, justify="right")
    for s in summaries:
        hard = s.get("no_sot_categories")
        targets = s["targets"]
        table.add_row(
            f"{s['train']} -> {s['test']}",
            s["head"],
            str(s["n"]),
            _pct(s["accuracy"]) + _ci(s["accuracy_ci95"]),
            _pct(s["majority_baseline"]),
            _pct(s["precision"]),
            _pct(s["recall"]),
            f"{_pct(s['false_sot_rate'])}{_ci(s['false_sot_ci95'])} ({s['false_sot'][0]}/{s['false_sot'][1]})",
            "" if hard is None else f"{hard['sent_to_sot']} of {hard['n']}",
            ""
            if targets is None
            else (
                "all met" if all(targets.values()) else "missed: " + ", ".join(k for k, ok in targets.items() if not ok)
            ),
        )
    Console().print(table)
