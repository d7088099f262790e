"""The trained router: a TF-IDF + logistic-regression text classifier, run in pure Python from a JSON file.

Inference needs nothing beyond the standard library: the packaged `trained_router.json` holds the
vocabulary with its IDF weights and coefficients, the intercept, the decision threshold and how it was
trained. Training (`train_model`, behind `sot router train`) uses scikit-learn, a development dependency
imported only there, and checks that the pure-Python scores equal scikit-learn's before it saves anything.

Features, chosen by cross-validation on LIMA (see `sot router train`): word unigrams and bigrams (with a
start-of-text marker, digits folded to "0"), sublinear TF, smoothed IDF, L2 norm. Character n-grams added
no measurable accuracy (+0.004 AUC, inside the fold-to-fold spread) at five times the size. This module
deliberately does not guess for long inputs: every text is cut as `router_input` cuts it, before and
after training alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sot.backends.base import Message
from sot.errors import ConfigError
from sot.router.base import RouteDecision, RouterInput, router_input

FORMAT = "sot-router-tfidf-logreg/1"
ARTEFACT_NAME = "trained_router.json"

_TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
START = "<s>"

# A follow-up's earlier user turns count for up to this share of the score, the latest request for the
# rest. Not fit (there is no multi-turn training data): large enough that "why?" after a math question
# stays normal, small enough that "now write it in Python" after a list question stays a code request.
DEFAULT_CONTEXT_WEIGHT = 0.35
# Elliptical follow-ups ("what about cats?") are short; a longer request says what it wants by itself,
# so the earlier turns' share shrinks in proportion beyond this many tokens.
SHORT_REQUEST_TOKENS = 6


def tokens(text: str) -> list[str]:
    """Lower-cased word, number and symbol tokens; every number becomes "0".

    >>> tokens("What's 2+2, MIPS?")
    ['what', "'", 's', '0', '+', '0', ',', 'mips', '?']
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return ["0" if t[0] in "0123456789" else t for t in _TOKEN.findall(text)]


def terms(text: str) -> list[str]:
    """The model's features of one text, with repeats: unigrams, then bigrams (a start marker first).

    A unigram never contains a space and a bigram always does, so the two share one vocabulary.

    >>> terms("How to cook?")
    ['how', 'to', 'cook', '?', '<s> how', 'how to', 'to cook', 'cook ?']
    """
    toks = tokens(text)
    out = list(toks)
    prev = START
    for tok in toks:
        out.append(prev + " " + tok)
        prev = tok
    return out


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _round(x: float) -> float:
    # Six significant digits keep scores within 1e-5 of the unrounded model and the file small.
    return float(f"{x:.6g}")


def _display(term: str) -> str:
    return term.replace(START + " ", "^")


@dataclass(frozen=True)
class TrainedModel:
    """A linear model over TF-IDF features, loaded from (and saved to) the JSON artefact."""

    idf: dict[str, float]
    coef: dict[str, float]
    intercept: float
    threshold: float
    context_weight: float = DEFAULT_CONTEXT_WEIGHT
    training: dict[str, Any] = field(default_factory=dict)
    checks: tuple[tuple[str, float], ...] = ()

    # -- features ---------------------------------------------------------------------------------------

    def vector(self, text: str) -> dict[str, float]:
        """The L2-normalised TF-IDF vector of `text` over the model's vocabulary (scikit-learn's formula:
        tf = 1 + ln(count), idf = ln((1 + n) / (1 + df)) + 1)."""
        counts = Counter(t for t in terms(text) if t in self.idf)
        weights = {t: (1.0 + math.log(c)) * self.idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {t: w / norm for t, w in weights.items()} if norm else {}

    def margin(self, text: str) -> float:
        """The text's contribution to the logit (without the intercept)."""
        return sum(self.coef[t] * x for t, x in self.vector(text).items())

    def probability(self, text: str) -> float:
        """P(SoT suits the question) for a single question, as scikit-learn's `predict_proba` gives it."""
        return _sigmoid(self.intercept + self.margin(text))

    def conversation_probability(self, view: RouterInput) -> float:
        """P(SoT) of a conversation: the latest request's margin blended with the earlier user turns'."""
        margin = self.margin(view.request)
        if view.context:
            weight = self.context_weight * min(1.0, SHORT_REQUEST_TOKENS / max(len(tokens(view.request)), 1))
            margin = (1.0 - weight) * margin + weight * self.margin(view.context_text())
        return _sigmoid(self.intercept + margin)

    def cues(self, text: str, *, positive: bool, k: int = 3) -> list[str]:
        """The `k` terms of `text` that pushed the score most towards SoT (or towards normal)."""
        contributions = [(self.coef[t] * x, t) for t, x in self.vector(text).items()]
        sign = 1.0 if positive else -1.0
        best = sorted((c for c in contributions if sign * c[0] > 0), key=lambda c: -sign * c[0])
        return [_display(t) for _, t in best[:k]]

    # -- (de)serialisation ------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The artefact's text: a readable header, then one vocabulary entry a line (diffable, ~200 kB)."""
        header = {
            "format": FORMAT,
            "features": {
                "tokens": _TOKEN.pattern,
                "numbers": "0",
                "ngrams": [1, 2],
                "start_marker": START,
                "tf": "1 + ln(count)",
                "idf": "ln((1 + n) / (1 + df)) + 1",
                "norm": "l2",
            },
            "intercept": self.intercept,
            "threshold": self.threshold,
            "context_weight": self.context_weight,
            "training": self.training,
            "checks": [[text, p] for text, p in self.checks],
        }
        lines = ["{"]
        for key, value in header.items():
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False, sort_keys=True)},")
        lines.append('  "vocabulary": [')
        entries = sorted(self.idf)
        for i, term in enumerate(entries):
            sep = "," if i < len(entries) - 1 else ""
            row = [term, self.idf[term], self.coef.get(term, 0.0)]
            lines.append("    " + json.dumps(row, ensure_ascii=False) + sep)
        lines.append("  ]")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "<model>") -> TrainedModel:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ConfigError(f"{source}: not a {FORMAT} model (format {data.get('format')!r})")
            idf: dict[str, float] = {}
            coef: dict[str, float] = {}
            for term, term_idf, term_coef in data["vocabulary"]:
                idf[str(term)] = float(term_idf)
                if term_coef:
                    coef[str(term)] = float(term_coef)
            for term in idf:
                coef.setdefault(term, 0.0)
            return cls(
                idf=idf,
                coef=coef,
                intercept=float(data["intercept"]),
                threshold=float(data["threshold"]),
                context_weight=float(data.get("context_weight", DEFAULT_CONTEXT_WEIGHT)),
                training=dict(data.get("training", {})),
                checks=tuple((str(t), float(p)) for t, p in data.get("checks", [])),
            )
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: malformed router model ({exc})") from None


def packaged_model_path() -> Path:
    """Where the model shipped with the package lives (the default output of `sot router train`)."""
    return Path(str(resources.files("sot.router").joinpath(ARTEFACT_NAME)))


def load_model(path: str | Path | None = None) -> TrainedModel:
    """A model from a JSON artefact; the packaged one by default (cached: it is read once per process)."""
    if path is None:
        return _packaged_model()
    return _read_model(Path(path))


def _read_model(path: Path) -> TrainedModel:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the router model {path}: {exc.strerror or exc}") from None
    return TrainedModel.from_json(text, source=str(path))


@functools.lru_cache(maxsize=1)
def _packaged_model() -> TrainedModel:
    return _read_model(packaged_model_path())


class TrainedRouter:
    """Routes with the trained classifier: SoT when P(SoT) reaches the model's threshold."""

    name = "trained"

    def __init__(self, model: TrainedModel | None = None, *, threshold: float | None = None) -> None:
        self.model = model if model is not None else load_model()
        self.threshold = self.model.threshold if threshold is None else threshold

    def decide_view(self, view: RouterInput) -> RouteDecision:
        """The decision for an already-bounded conversation (synchronous: it takes well under a millisecond)."""
        if not view.request:
            return RouteDecision(False, self.name, "no user request to route: normal decoding", None)
        p = self.model.conversation_probability(view)
        use_sot = p >= self.threshold
        cues = self.model.cues(view.request, positive=use_sot)
        because = f"; cues: {', '.join(repr(c) for c in cues)}" if cues else ""
        follow = " (follow-up, earlier turns weighed in)" if view.context else ""
        verdict = f"p(SoT)={p:.3f} {'≥' if use_sot else '<'} {self.threshold:.2f}{follow}{because}"
        return RouteDecision(use_sot, self.name, verdict, p)

    async def decide(self, messages: Sequence[Message]) -> RouteDecision:
        return self.decide_view(router_input(messages))


# -- training -----------------------------------------------------------------------------------------

# The texts whose scores are stored with the model, so that a test can check the pure-Python scorer
# against scikit-learn's without the training data. Written for this purpose, not taken from a dataset.
CHECK_TEXTS = (
    "What are some effective ways to improve my sleep?",
    "Solve for x: 2x + 3 = 11.",
    "Write a Python function that reverses a linked list.",
    "How to plan a birthday party on a budget?",
    "Tell me a joke about cats.",
    "What if the printing press had never been invented?",
    "",
)


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: bool


def prepare(question: str) -> str:
    """A question cut exactly as a one-turn conversation is cut for routing (train/serve parity)."""
    return router_input([Message(role="user", content=question)]).request


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _precision_threshold(
    probs: Sequence[Sequence[float]], labels: Sequence[bool], min_precision: float
) -> tuple[float, bool]:
    """The lowest threshold (0.30 to 0.90 in steps of 0.01) whose cross-validated precision, averaged over
    repeats, reaches `min_precision`; or the most precise one if none does (flagged False)."""
    from sot.router.metrics import confusion

    best = (0.5, -1.0)
    for step in range(30, 91):
        t = step / 100
        precisions = [confusion(labels, [p >= t for p in run]).precision for run in probs]
        if any(p is None for p in precisions):
            break
        mean = sum(p for p in precisions if p is not None) / len(precisions)
        if mean >= min_precision:
            return t, True
        if mean > best[1]:
            best = (t, mean)
    return best[0], False


def train_model(
    dataset: str | Path,
    *,
    seed: int = 0,
    min_precision: float = 0.75,
    c_values: Iterable[float] = (1.0, 3.0, 10.0),
    folds: int = 5,
    repeats: int = 3,
    context_weight: float = DEFAULT_CONTEXT_WEIGHT,
    progress: Any = None,
) -> TrainedModel:
    """Fit the router on a labelled JSONL dataset (`question`, `sot_suitable`); deterministic for a seed.

    Regularisation C is chosen by cross-validated ROC AUC (`repeats` x `folds`-fold, stratified, the
    TF-IDF vocabulary refit inside each fold); the decision threshold is the lowest one whose
    cross-validated precision reaches `min_precision`, which keeps the router on the side of normal
    decoding: a skeleton for a math question costs more than a missed skeleton.
    """
    try:
        import numpy as np
        import sklearn
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
    except ImportError as exc:
        raise ConfigError(
            f"training the router needs scikit-learn ({exc.name} is missing): pip install scikit-learn"
        ) from None
    from sot.eval.dataset import load_dataset
    from sot.router.metrics import confusion

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    path = Path(dataset)
    rows = [q for q in load_dataset(path) if q.sot_suitable is not None]
    if len(rows) < 2 * folds:
        raise ConfigError(f"{path}: {len(rows)} labelled questions; training needs at least {2 * folds}")
    texts = [prepare(q.question) for q in rows]
    labels = [bool(q.sot_suitable) for q in rows]
    y = np.array(labels, dtype=int)
    if y.sum() < folds or (len(y) - y.sum()) < folds:
        raise ConfigError(f"{path}: too few examples of one label for {folds}-fold cross-validation")

    # Each fold refits the vocabulary; tokenising every text once, not once per fold, saves most of the time.
    cached = {t: terms(t) for t in texts}

    def analyzer(text: str) -> list[str]:
        return cached[text] if text in cached else terms(text)

    def pipeline(c: float) -> Any:
        return make_pipeline(
            TfidfVectorizer(analyzer=analyzer, sublinear_tf=True, min_df=2, dtype=np.float64),
            LogisticRegression(C=c, max_iter=5000),
        )

    cv_runs: dict[float, list[list[float]]] = {}
    aucs: dict[float, float] = {}
    for c in c_values:
        runs = []
        for r in range(repeats):
            split = StratifiedKFold(folds, shuffle=True, random_state=seed + r)
            oof = cross_val_predict(pipeline(c), texts, y, cv=split, method="predict_proba")[:, 1]
            runs.append([float(p) for p in oof])
        cv_runs[c] = runs
        aucs[c] = sum(float(roc_auc_score(y, run)) for run in runs) / repeats
        say(f"C={c:g}: cross-validated ROC AUC {aucs[c]:.3f}")
    best_c = max(aucs, key=lambda c: (aucs[c], -c))  # ties go to the stronger regularisation
    threshold, reached = _precision_threshold(cv_runs[best_c], labels, min_precision)
    say(f"chose C={best_c:g}; threshold {threshold:.2f} (CV precision target {min_precision:.2f})")

    cv_confusions = [confusion(labels, [p >= threshold for p in run]) for run in cv_runs[best_c]]

    def mean_of(metric: str) -> float | None:
        values = [getattr(cm, metric) for cm in cv_confusions]
        return None if None in values else round(sum(values) / len(values), 4)

    fitted = pipeline(best_c).fit(texts, y)
    vectorizer, classifier = fitted.steps[0][1], fitted.steps[1][1]
    idf = {str(t): _round(float(vectorizer.idf_[j])) for t, j in vectorizer.vocabulary_.items()}
    coef = {str(t): _round(float(classifier.coef_[0, j])) for t, j in vectorizer.vocabulary_.items()}
    intercept = _round(float(classifier.intercept_[0]))

    training = {
        "dataset": path.name,
        "dataset_sha256": sha256_file(path),
        "examples": len(rows),
        "positives": int(y.sum()),
        "seed": seed,
        "folds": folds,
        "repeats": repeats,
        "C": best_c,
        "cv_auc_by_C": {f"{c:g}": round(a, 4) for c, a in aucs.items()},
        "threshold_rule": f"lowest threshold with mean CV precision >= {min_precision}",
        "threshold_rule_met": reached,
        "cv_at_threshold": {
            "accuracy": mean_of("accuracy"),
            "precision": mean_of("precision"),
            "recall": mean_of("recall"),
            "false_sot_rate": mean_of("false_sot_rate"),
            "auc": round(aucs[best_c], 4),
        },
        "vocabulary_size": len(idf),
        "scikit_learn": sklearn.__version__,
    }
    sk_checks = fitted.predict_proba(list(CHECK_TEXTS))[:, 1]
    model = TrainedModel(
        idf=idf,
        coef=coef,
        intercept=intercept,
        threshold=threshold,
        context_weight=context_weight,
        training=training,
        checks=tuple((t, _round(float(p))) for t, p in zip(CHECK_TEXTS, sk_checks, strict=True)),
    )
    # Parity: the pure-Python scorer must give scikit-learn's probabilities on every training text.
    reference = fitted.predict_proba(texts)[:, 1]
    worst = max(abs(model.probability(t) - float(p)) for t, p in zip(texts, reference, strict=True))
    if worst > 1e-4:
        raise RuntimeError(f"pure-Python scores differ from scikit-learn's by up to {worst:.2e}")
    say(f"pure-Python scores match scikit-learn's (max difference {worst:.1e})")
    return model


def save_model(model: TrainedModel, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(model.to_json(), encoding="utf-8")
    if out.resolve() == packaged_model_path().resolve():
        _packaged_model.cache_clear()
    return out
