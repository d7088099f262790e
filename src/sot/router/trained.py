"""The trained router: logistic regression over word features and the embedded model's view, from one JSON file.

The packaged `trained_router.json` holds two heads over the same TF-IDF vocabulary: `combined` (word
features plus 576 weights over a mean-pooled hidden state of SmolLM2-135M, the embedded model, see
`sot.router.embeddings`) and `words` (word features only). The router uses `combined`, and falls back to
`words` when the embedding cannot be computed, saying so in the decision's reason. Scoring is plain
Python over the stored weights; the embedding needs the packaged GGUF and llama.cpp's tokenizer. Training
is `sot.router.training`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from sot.backends.base import Message
from sot.errors import ConfigError
from sot.router.base import RouteDecision, RouterInput, router_input
from sot.router.embeddings import EmbeddingSpec
from sot.router.features import display, tfidf_vector, tokens

FORMAT = "sot-router/2"
LEGACY_FORMAT = "sot-router-tfidf-logreg/1"  # word features only; still readable
ARTEFACT_NAME = "trained_router.json"

# A follow-up's earlier user turns weigh up to this share of the word features, the latest request the
# rest: large enough that "why?" after a math question stays normal, small enough that "now write it in
# Python" after a list question stays a code request. Not fit (52 conversations are too few to fit it);
# the embedding sees the whole conversation anyway.
DEFAULT_CONTEXT_WEIGHT = 0.35
# Elliptical follow-ups ("what about cats?") are short; a longer request says what it wants by itself,
# so the earlier turns' share shrinks in proportion beyond this many tokens.
SHORT_REQUEST_TOKENS = 6
# At load, the embedder must reproduce a stored check score this closely, or the router falls back to
# word features: it catches a different model file, not rounding (scores differ by ~1e-5 across runs).
SELF_CHECK_TOLERANCE = 0.01


def sigmoid(x: float) -> float:
    import math

    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def context_share(view: RouterInput, context_weight: float) -> float:
    """How much the earlier user turns weigh in the word features (0 for a single question)."""
    if not view.context:
        return 0.0
    return context_weight * min(1.0, SHORT_REQUEST_TOKENS / max(len(tokens(view.request)), 1))


@dataclass(frozen=True)
class Head:
    """One logistic regression: a weight per vocabulary term, and one per embedding dimension if any."""

    coef: dict[str, float]
    intercept: float
    threshold: float
    embed: tuple[float, ...] = ()

    def margin(self, vector: dict[str, float], embedding: Sequence[float] | None = None) -> float:
        """The logit of a word vector (and embedding, for a combined head)."""
        total = self.intercept + sum(self.coef.get(t, 0.0) * x for t, x in vector.items())
        if self.embed:
            if embedding is None or len(embedding) != len(self.embed):
                raise ValueError(f"this head needs a {len(self.embed)}-dimensional embedding")
            total += sum(w * x for w, x in zip(self.embed, embedding, strict=True))
        return total


@dataclass(frozen=True)
class Check:
    """A text and the probabilities scikit-learn gave it at training time, per head."""

    text: str
    words: float
    combined: float | None = None


@dataclass(frozen=True)
class TrainedModel:
    """The vocabulary, the two heads, how to embed, and how the model was trained."""

    idf: dict[str, float]
    words: Head
    combined: Head | None = None
    embedding: EmbeddingSpec | None = None
    context_weight: float = DEFAULT_CONTEXT_WEIGHT
    training: dict[str, Any] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()

    def vector(self, view: RouterInput) -> dict[str, float]:
        """The conversation's word vector: the request's TF-IDF, blended with the earlier user turns'."""
        vector = tfidf_vector(view.request, self.idf)
        weight = context_share(view, self.context_weight)
        if not weight:
            return vector
        blended = {t: (1.0 - weight) * x for t, x in vector.items()}
        for t, x in tfidf_vector(view.context_text(), self.idf).items():
            blended[t] = blended.get(t, 0.0) + weight * x
        return blended

    def head_for(self, embedding: Sequence[float] | None) -> Head:
        """The combined head when there is an embedding (and the model has one), else the word head."""
        return self.combined if embedding is not None and self.combined is not None else self.words

    def probability(self, view: RouterInput, embedding: Sequence[float] | None = None) -> float:
        """P(SoT suits the reply): the combined head given an embedding, else the word head."""
        head = self.head_for(embedding)
        return sigmoid(head.margin(self.vector(view), embedding if head.embed else None))

    def text_probability(self, text: str, embedding: Sequence[float] | None = None) -> float:
        """`probability` of a one-turn conversation."""
        return self.probability(router_input([Message(role="user", content=text)]), embedding)

    def cues(
        self, view: RouterInput, head: Head, *, positive: bool, k: int = 3, vector: dict[str, float] | None = None
    ) -> list[str]:
        """The `k` terms of the request that pushed the score most towards SoT (or towards normal);
        `vector` is the request's TF-IDF vector when the caller has it."""
        request = vector if vector is not None else tfidf_vector(view.request, self.idf)
        contributions = [(head.coef.get(t, 0.0) * x, t) for t, x in request.items()]
        sign = 1.0 if positive else -1.0
        best = sorted((c for c in contributions if sign * c[0] > 0), key=lambda c: -sign * c[0])
        return [display(t) for _, t in best[:k]]

    # -- (de)serialisation ------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The artefact's text: a readable header, then one vocabulary entry a line (diffable)."""
        from sot.router.artefact import model_to_json

        return model_to_json(self)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<model>") -> TrainedModel:
        from sot.router.artefact import model_from_json

        return model_from_json(text, source=source)


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


def save_model(model: TrainedModel, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(model.to_json(), encoding="utf-8")
    if out.resolve() == packaged_model_path().resolve():
        _packaged_model.cache_clear()
    return out


class EmbedderLike(Protocol):
    """What the router needs of an embedder (`sot.router.embeddings.open_embedder`'s, or a test double)."""

    def embed(self, view: RouterInput) -> list[float]: ...


class _Auto:
    """The default embedder: the shared one for the model's `EmbeddingSpec`, loaded on first use."""


AUTO = _Auto()


class TrainedRouter:
    """Routes with the trained model: SoT when P(SoT) reaches the head's threshold.

    `embedder`: AUTO (default) loads the embedded model's tokenizer and the tensors the model reads, on
    first use (`prepare`); None routes on word features only; anything with `embed(view)` is used as
    given. When no embedding is available the word head decides and the reason says why.
    """

    name = "trained"

    def __init__(
        self,
        model: TrainedModel | None = None,
        *,
        threshold: float | None = None,
        embedder: EmbedderLike | _Auto | None = AUTO,
    ) -> None:
        self.model = model if model is not None else load_model()
        self.threshold = threshold
        self._embedder_choice = embedder
        self._embedder: EmbedderLike | None = None
        self.fallback_reason: str | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        """Whether the embedder was loaded (or given up on): deciding then takes milliseconds."""
        return self._ready

    def prepare(self) -> None:
        """Load the embedder now (otherwise the first decision does); never raises."""
        if self._ready:
            return
        self._embedder, self.fallback_reason = self._acquire()
        self._ready = True

    def _acquire(self) -> tuple[EmbedderLike | None, str | None]:
        model = self.model
        if model.combined is None or model.embedding is None:
            return None, "the model has no embedding head"
        choice = self._embedder_choice
        if choice is None:
            return None, "embedding disabled"
        if isinstance(choice, _Auto):
            from sot.router.embeddings import shared_embedder

            try:
                choice = shared_embedder(model.embedding)
            except Exception as exc:  # a missing package, file or library: route on words, say why
                return None, f"the embedding model could not be loaded ({exc})"
        check = next((c for c in model.checks if c.combined is not None), None)
        if check is not None and check.combined is not None:
            try:
                got = model.text_probability(check.text, choice.embed(router_input(_user(check.text))))
            except Exception as exc:
                return None, f"the embedding model failed ({exc})"
            if abs(got - check.combined) > SELF_CHECK_TOLERANCE:
                return None, f"the embedding model does not match training (check {got:.3f} vs {check.combined:.3f})"
        return choice, None

    def decide_view(self, view: RouterInput) -> RouteDecision:
        """The decision for an already-bounded conversation (synchronous; loads the embedder if needed)."""
        if not view.request:
            return RouteDecision(False, self.name, "no user request to route: normal decoding", None)
        self.prepare()
        embedding: list[float] | None = None
        note = ""
        if self._embedder is not None:
            try:
                embedding = self._embedder.embed(view)
            except Exception as exc:
                note = f" [word features only: embedding failed ({exc})]"
        elif self.fallback_reason:
            note = f" [word features only: {self.fallback_reason}]"
        model = self.model
        head = model.head_for(embedding)
        vector = model.vector(view)
        p = sigmoid(head.margin(vector, embedding if head.embed else None))
        threshold = head.threshold if self.threshold is None else self.threshold
        use_sot = p >= threshold
        cues = model.cues(view, head, positive=use_sot, vector=None if view.context else vector)
        because = f"; cues: {', '.join(repr(c) for c in cues)}" if cues else ""
        follow = " (follow-up, earlier turns weighed in)" if view.context or view.transcript_turns else ""
        verdict = f"p(SoT)={p:.3f} {'≥' if use_sot else '<'} {threshold:.2f}{follow}{because}{note}"
        return RouteDecision(use_sot, self.name, verdict, p)

    async def decide(self, messages: Sequence[Message]) -> RouteDecision:
        view = router_input(messages)
        if view.request and not self._ready:
            await asyncio.to_thread(self.prepare)  # loading takes ~0.2 s, once per process
        return self.decide_view(view)


def _user(text: str) -> list[Message]:
    return [Message(role="user", content=text)]
