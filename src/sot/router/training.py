"""Fit the trained router (`sot router train`): word features plus the embedded model's view, seeded CV.

Deterministic for the data, seed and scikit-learn version (an embedding computed through llama.cpp's
graph, `--stage ffn_inp|l_out`, may differ in its last bits across CPUs). Recipe, fixed before any test set
was scored:
- features: TF-IDF of the latest request (blended with the earlier user turns for follow-ups, as routing
  blends them) and, for the combined head, the standardised embedding scaled by `s`;
- regularisation C (and `s`) by mean cross-validated ROC AUC (`repeats` x `folds`-fold, stratified, the
  vocabulary and standardisation refit inside each fold);
- the threshold: the lowest whose mean cross-validated false-SoT rate is at most `target_false_sot`,
  not the most accurate one: a skeleton for a math question costs more than a missed skeleton.
Scikit-learn is imported only here; the model it writes is scored in plain Python (checked on every
training example before anything is saved).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sot.errors import ConfigError
from sot.router.base import RouterInput, router_input
from sot.router.data import Example, digest, load_examples
from sot.router.embeddings import EmbeddingSpec
from sot.router.features import terms
from sot.router.metrics import confusion
from sot.router.trained import DEFAULT_CONTEXT_WEIGHT, Check, Head, TrainedModel, context_share

# Texts whose scores are stored with the model, so that a test can check the plain-Python scorer
# against scikit-learn's. Written for this purpose, not taken from a dataset.
CHECK_TEXTS = (
    "What are some effective ways to improve my sleep?",
    "Solve for x: 2x + 3 = 11.",
    "Write a Python function that reverses a linked list.",
    "How to plan a birthday party on a budget?",
    "Tell me a joke about cats.",
    "What if the printing press had never been invented?",
)
Embed = Callable[[RouterInput], list[float]]


@dataclass(frozen=True)
class Recipe:
    """How a model is fit; `sot router train` and every cross-dataset run use the same one."""

    seed: int = 0
    folds: int = 5
    repeats: int = 2
    c_values: tuple[float, ...] = (1.0, 3.0, 10.0)
    embed_scales: tuple[float, ...] = (0.01, 0.02, 0.05)
    target_false_sot: float = 0.08
    min_df: int = 3
    context_weight: float = DEFAULT_CONTEXT_WEIGHT


DEFAULT_RECIPE = Recipe()
DEFAULT_SPEC = EmbeddingSpec()


@dataclass
class Prepared:
    """Examples turned into what the features need, computed once (the embedding is the slow part)."""

    examples: list[Example]
    views: list[RouterInput]
    shares: np.ndarray  # context weight per example
    embeddings: np.ndarray | None
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.array([e.label for e in self.examples], dtype=int)

    def subset(self, index: Sequence[int] | np.ndarray) -> Prepared:
        idx = list(index)
        return Prepared(
            [self.examples[i] for i in idx],
            [self.views[i] for i in idx],
            self.shares[idx],
            None if self.embeddings is None else self.embeddings[idx],
        )

    @staticmethod
    def concat(parts: Sequence[Prepared]) -> Prepared:
        embedded = all(p.embeddings is not None for p in parts)
        return Prepared(
            [e for p in parts for e in p.examples],
            [v for p in parts for v in p.views],
            np.concatenate([p.shares for p in parts]),
            np.vstack([p.embeddings for p in parts if p.embeddings is not None]) if embedded else None,
        )


def prepare(examples: Sequence[Example], embed: Embed | None, recipe: Recipe = DEFAULT_RECIPE) -> Prepared:
    """Bound each conversation as routing does, and embed it (unless `embed` is None)."""
    views = [router_input(list(e.messages)) for e in examples]
    shares = np.array([context_share(v, recipe.context_weight) for v in views])
    embeddings = None if embed is None else np.array([embed(v) for v in views], dtype=np.float64)
    return Prepared(list(examples), views, shares, embeddings)


def _sklearn() -> Any:
    try:
        import sklearn
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise ConfigError(
            f"training the router needs scikit-learn ({exc.name} is missing): pip install 'sot[train]'"
        ) from None
    return sklearn, TfidfVectorizer, LogisticRegression, StandardScaler


@dataclass
class Fitted:
    """A fitted vectorizer, standardiser (combined head only) and classifier."""

    vectorizer: Any
    scaler: Any
    classifier: Any
    scale: float | None

    def matrix(self, data: Prepared) -> Any:
        import scipy.sparse as sp

        requests = self.vectorizer.transform([v.request for v in data.views])
        contexts = self.vectorizer.transform([v.context_text() for v in data.views])
        shares = sp.diags(data.shares)
        words = sp.diags(1.0 - data.shares) @ requests + shares @ contexts
        if self.scale is None or data.embeddings is None:
            return words.tocsr()
        dense = self.scaler.transform(data.embeddings) * self.scale
        return sp.hstack([words, sp.csr_matrix(dense)]).tocsr()

    def predict(self, data: Prepared) -> np.ndarray:
        return np.asarray(self.classifier.predict_proba(self.matrix(data))[:, 1])


def fit(data: Prepared, c: float, scale: float | None, recipe: Recipe) -> Fitted:
    """One model on `data`: words only when `scale` is None, else words plus the scaled embedding."""
    _, tfidf, logistic, standard = _sklearn()
    cache: dict[str, list[str]] = {}

    def analyzer(text: str) -> list[str]:
        if text not in cache:
            cache[text] = terms(text)
        return cache[text]

    vectorizer = tfidf(analyzer=analyzer, sublinear_tf=True, min_df=recipe.min_df, dtype=np.float64)
    vectorizer.fit([v.request for v in data.views])
    scaler = None
    if scale is not None:
        if data.embeddings is None:
            raise ConfigError("the combined head needs embeddings")
        scaler = standard().fit(data.embeddings)
    fitted = Fitted(vectorizer, scaler, None, scale)
    fitted.classifier = logistic(C=c, max_iter=5000).fit(fitted.matrix(data), data.labels)
    return fitted


def cross_validate(data: Prepared, c: float, scale: float | None, recipe: Recipe) -> list[np.ndarray]:
    """Out-of-fold probabilities, one array per repeat (stratified folds seeded `seed + repeat`)."""
    from sklearn.model_selection import StratifiedKFold

    runs = []
    for r in range(recipe.repeats):
        oof = np.zeros(len(data.labels))
        split = StratifiedKFold(recipe.folds, shuffle=True, random_state=recipe.seed + r)
        for train, test in split.split(np.zeros(len(data.labels)), data.labels):
            oof[test] = fit(data.subset(train), c, scale, recipe).predict(data.subset(test))
        runs.append(oof)
    return runs


def false_sot_threshold(runs: Sequence[np.ndarray], labels: np.ndarray, target: float) -> tuple[float, bool]:
    """The lowest threshold (0.30 to 0.90 by 0.01) whose mean false-SoT rate over `runs` is at most
    `target`; 0.90 (flagged False) if none is."""
    truth = [bool(x) for x in labels]
    for step in range(30, 91):
        t = step / 100
        rates = [confusion(truth, [bool(p >= t) for p in run]).false_sot_rate for run in runs]
        if all(r is not None for r in rates) and sum(r for r in rates if r is not None) / len(rates) <= target:
            return t, True
    return 0.9, False


def _cv_summary(runs: Sequence[np.ndarray], labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    truth = [bool(x) for x in labels]
    matrices = [confusion(truth, [bool(p >= threshold) for p in run]) for run in runs]

    def mean(metric: str) -> float | None:
        values = [getattr(m, metric) for m in matrices]
        return None if None in values else round(sum(values) / len(values), 4)

    return {k: mean(k) for k in ("accuracy", "precision", "recall", "false_sot_rate")}


def _select(data: Prepared, scales: Sequence[float | None], recipe: Recipe, say: Callable[[str], None]) -> Any:
    """The (C, scale) with the best mean CV ROC AUC, its CV runs, and the grid's AUCs."""
    from sklearn.metrics import roc_auc_score

    grid: dict[tuple[float, float | None], tuple[float, list[np.ndarray]]] = {}
    for scale in scales:
        for c in recipe.c_values:
            runs = cross_validate(data, c, scale, recipe)
            auc = sum(float(roc_auc_score(data.labels, run)) for run in runs) / len(runs)
            grid[(c, scale)] = (auc, runs)
            say(f"{'words' if scale is None else f'combined s={scale:g}'} C={c:g}: CV ROC AUC {auc:.3f}")
    # ties go to the stronger regularisation, then the smaller embedding scale
    best = max(grid, key=lambda k: (round(grid[k][0], 6), -k[0], -(k[1] or 0.0)))
    return (
        best,
        grid[best][1],
        {f"C={c:g}" + ("" if s is None else f",s={s:g}"): round(a, 4) for (c, s), (a, _) in grid.items()},
    )


def _round(x: float) -> float:
    # Six significant digits keep scores within 1e-5 of the unrounded model and the file small.
    return float(f"{x:.6g}")


def _head(fitted: Fitted, threshold: float) -> Head:
    """The plain-Python head of a fitted model: coefficients by term, standardisation folded in."""
    vocabulary = fitted.vectorizer.vocabulary_
    weights = fitted.classifier.coef_[0]
    coef = {str(t): _round(float(weights[j])) for t, j in vocabulary.items()}
    intercept = float(fitted.classifier.intercept_[0])
    embed: tuple[float, ...] = ()
    if fitted.scale is not None:
        raw = weights[len(vocabulary) :] * fitted.scale / fitted.scaler.scale_
        intercept -= float(raw @ fitted.scaler.mean_)
        embed = tuple(_round(float(w)) for w in raw)
    return Head(coef=coef, intercept=_round(intercept), threshold=threshold, embed=embed)


@dataclass
class HeadResult:
    """A fitted head with what cross-validation said about it."""

    fitted: Fitted
    head: Head
    summary: dict[str, Any]


def train_head(data: Prepared, recipe: Recipe, *, combined: bool, say: Callable[[str], None]) -> HeadResult:
    """Select C (and the embedding scale), choose the threshold from CV, and fit on all of `data`."""
    scales: Sequence[float | None] = recipe.embed_scales if combined else (None,)
    (c, scale), runs, grid = _select(data, scales, recipe, say)
    threshold, met = false_sot_threshold(runs, data.labels, recipe.target_false_sot)
    fitted = fit(data, c, scale, recipe)
    summary = {
        "C": c,
        "embed_scale": scale,
        "cv_auc": grid,
        "threshold_rule": f"lowest threshold with mean CV false-SoT rate <= {recipe.target_false_sot}",
        "threshold_rule_met": met,
        "cv_at_threshold": _cv_summary(runs, data.labels, threshold),
    }
    scaled = "" if scale is None else f" s={scale:g}"
    say(f"{'combined' if combined else 'words'}: C={c:g}{scaled}, threshold {threshold:.2f}")
    return HeadResult(fitted, _head(fitted, threshold), summary)


def fit_model(data: Prepared, recipe: Recipe, spec: EmbeddingSpec | None, say: Callable[[str], None]) -> TrainedModel:
    """Both heads on `data` (the combined one only when `data` has embeddings), checked for parity."""
    words = train_head(data, recipe, combined=False, say=say)
    combined = None if data.embeddings is None or spec is None else train_head(data, recipe, combined=True, say=say)
    idf = {
        str(t): _round(float(words.fitted.vectorizer.idf_[j])) for t, j in words.fitted.vectorizer.vocabulary_.items()
    }
    model = TrainedModel(
        idf=idf,
        words=words.head,
        combined=None if combined is None else combined.head,
        embedding=None if combined is None else spec,
        context_weight=recipe.context_weight,
        training={"words": words.summary, **({"combined": combined.summary} if combined else {})},
    )
    _check_parity(model, data, words, combined)
    return model


def _check_parity(model: TrainedModel, data: Prepared, words: HeadResult, combined: HeadResult | None) -> None:
    """The plain-Python scores must equal scikit-learn's on every training example, for both heads."""
    worst = 0.0
    for result in (words, combined):
        if result is None:
            continue
        reference = result.fitted.predict(data)
        for i, view in enumerate(data.views):
            embedding = None
            if result.fitted.scale is not None and data.embeddings is not None:
                embedding = [float(x) for x in data.embeddings[i]]
            worst = max(worst, abs(model.probability(view, embedding) - float(reference[i])))
    if worst > 1e-4:
        raise RuntimeError(f"plain-Python scores differ from scikit-learn's by up to {worst:.2e}")


def _with_checks(model: TrainedModel, embed: Embed | None) -> TrainedModel:
    """The model with CHECK_TEXTS's scores per head, so loading can be checked without the data."""
    from dataclasses import replace

    checks = []
    for text in CHECK_TEXTS:
        view = router_input([_message(text)])
        combined = None
        if model.combined is not None and embed is not None:
            combined = _round(model.probability(view, embed(view)))
        checks.append(Check(text, _round(model.probability(view)), combined))
    return replace(model, checks=tuple(checks))


def _message(text: str) -> Any:
    from sot.backends.base import Message

    return Message(role="user", content=text)


def source_name(path: str | Path) -> str:
    """How training metadata names a dataset: the file name, or `sot/router/data` for the packaged one."""
    from sot.router.data import own_data_dir

    p = Path(path)
    return "sot/router/data" if p.resolve() == own_data_dir().resolve() else p.name


def default_embed(spec: EmbeddingSpec) -> Embed:
    """The embedded model's first `spec.layers` blocks, as routing uses them."""
    from sot.router.embeddings import shared_embedder

    return shared_embedder(spec).embed


def train_model(
    datasets: Sequence[str | Path],
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    spec: EmbeddingSpec | None = DEFAULT_SPEC,
    embed: Embed | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Fit the router on labelled JSONL files or directories (see `sot.router.data`); deterministic.

    `spec=None` trains the word head only. `embed` replaces the embedded model (tests pass a stand-in).
    """
    say = progress or (lambda _message: None)
    sklearn = _sklearn()[0]
    examples: list[Example] = []
    sources = []
    for path in datasets:
        found = load_examples(path)
        sources.append({"name": source_name(path), "examples": len(found), "positives": sum(e.label for e in found)})
        examples.extend(found)
    labels = [e.label for e in examples]
    if len(examples) < 2 * recipe.folds or min(labels.count(True), labels.count(False)) < recipe.folds:
        raise ConfigError(f"{len(examples)} labelled examples; training needs at least {recipe.folds} of each label")
    if spec is not None:
        spec = spec.for_this_cpu()  # the model records the format its features were computed with
    if spec is not None and embed is None:
        embed = default_embed(spec)
    say(f"embedding {len(examples)} conversations ..." if spec is not None else "word features only")
    data = prepare(examples, embed if spec is not None else None, recipe)
    model = fit_model(data, recipe, spec, say)
    from dataclasses import replace

    training = {
        "datasets": sources,
        "data_sha256": digest(datasets),
        "examples": len(examples),
        "positives": int(sum(labels)),
        "recipe": asdict(recipe),
        **model.training,
        "vocabulary_size": len(model.idf),
        "scikit_learn": sklearn.__version__,
        "machine": platform.machine(),
    }
    return _with_checks(replace(model, training=training), embed if spec is not None else None)
