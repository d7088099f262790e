"""The trained router's JSON artefact: a readable header, the embedding head's weights, one term a line.

Format `sot-router/2`: `words` and `combined` heads (intercept, threshold; `combined` also has one weight
per embedding dimension, with the training data's standardisation folded in), the `embedding` it reads,
training metadata, check scores, and the vocabulary as `[term, idf, words coef, combined coef]` rows.
Format `sot-router-tfidf-logreg/1` (word features only, `[term, idf, coef]` rows) is still read.
"""

from __future__ import annotations

import json
from typing import Any

from sot.errors import ConfigError
from sot.router.embeddings import EmbeddingSpec
from sot.router.features import FEATURES_DESCRIPTION
from sot.router.trained import DEFAULT_CONTEXT_WEIGHT, FORMAT, LEGACY_FORMAT, Check, Head, TrainedModel


def _line(key: str, value: Any) -> str:
    return f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False, sort_keys=True)},"


def model_to_json(model: TrainedModel) -> str:
    """The artefact's text (~300 kB: mostly the vocabulary, one entry a line so that diffs stay readable)."""
    combined = model.combined
    header: dict[str, Any] = {
        "format": FORMAT,
        "features": FEATURES_DESCRIPTION,
        "embedding": model.embedding.to_dict() if model.embedding else None,
        "context_weight": model.context_weight,
        "words": {"intercept": model.words.intercept, "threshold": model.words.threshold},
        "combined": None if combined is None else {"intercept": combined.intercept, "threshold": combined.threshold},
        "training": model.training,
        "checks": [[c.text, c.words, c.combined] for c in model.checks],
    }
    lines = ["{"] + [_line(k, v) for k, v in header.items()]
    if combined is not None:
        lines.append(_line("embedding_weights", list(combined.embed)))
    lines.append('  "vocabulary": [')
    entries = sorted(model.idf)
    for i, term in enumerate(entries):
        row = [term, model.idf[term], model.words.coef.get(term, 0.0)]
        if combined is not None:
            row.append(combined.coef.get(term, 0.0))
        lines.append("    " + json.dumps(row, ensure_ascii=False) + ("," if i < len(entries) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _head(data: dict[str, Any], coef: dict[str, float], embed: tuple[float, ...] = ()) -> Head:
    return Head(coef=coef, intercept=float(data["intercept"]), threshold=float(data["threshold"]), embed=embed)


def _legacy(data: dict[str, Any]) -> TrainedModel:
    idf: dict[str, float] = {}
    coef: dict[str, float] = {}
    for term, term_idf, term_coef in data["vocabulary"]:
        idf[str(term)] = float(term_idf)
        coef[str(term)] = float(term_coef)
    return TrainedModel(
        idf=idf,
        words=_head(data, coef),
        context_weight=float(data.get("context_weight", DEFAULT_CONTEXT_WEIGHT)),
        training=dict(data.get("training", {})),
        checks=tuple(Check(str(t), float(p)) for t, p in data.get("checks", [])),
    )


def _current(data: dict[str, Any]) -> TrainedModel:
    idf: dict[str, float] = {}
    words: dict[str, float] = {}
    combined: dict[str, float] = {}
    for row in data["vocabulary"]:
        term = str(row[0])
        idf[term] = float(row[1])
        words[term] = float(row[2])
        if len(row) > 3:
            combined[term] = float(row[3])
    combined_head = None
    spec = None
    if data.get("combined") is not None:
        weights = tuple(float(w) for w in data["embedding_weights"])
        combined_head = _head(data["combined"], combined, weights)
        spec = EmbeddingSpec.from_dict(data["embedding"])
    return TrainedModel(
        idf=idf,
        words=_head(data["words"], words),
        combined=combined_head,
        embedding=spec,
        context_weight=float(data.get("context_weight", DEFAULT_CONTEXT_WEIGHT)),
        training=dict(data.get("training", {})),
        checks=tuple(Check(str(t), float(w), None if c is None else float(c)) for t, w, c in data.get("checks", [])),
    )


def model_from_json(text: str, *, source: str = "<model>") -> TrainedModel:
    """Parse an artefact of either format; `ConfigError` names the source of a malformed one."""
    try:
        data = json.loads(text)
        fmt = data.get("format")
        if fmt == LEGACY_FORMAT:
            return _legacy(data)
        if fmt != FORMAT:
            raise ConfigError(f"{source}: not a {FORMAT} router model (format {fmt!r})")
        return _current(data)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ConfigError(f"{source}: malformed router model ({exc})") from None
