"""Per-request token sampling on one row of logits (numpy): greedy, temperature + top-p, repeat penalty.

Pure functions of (logits, recent tokens, RNG); it knows nothing of batches or the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from sot.backends.base import SamplingParams

# llama.cpp's default penalty window (penalty_last_n).
REPEAT_WINDOW = 64
# Candidates examined before falling back to a full sort for top-p: argpartition is O(vocab), a full
# argsort of 49k logits costs milliseconds per sequence per step.
_TOP_P_CANDIDATES = 1024


class Sampler:
    """The sampling state of one request: its parameters and its own RNG (reproducible with a seed)."""

    __slots__ = ("_rng", "params")

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # A per-request generator: concurrent requests never perturb each other's random streams.
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: npt.NDArray[np.float32], recent: Iterable[int]) -> int:
        """The next token from `logits` (modified in place), given the recent prompt+generated tokens."""
        p = self.params
        if p.repeat_penalty != 1.0:
            apply_repeat_penalty(logits, recent, p.repeat_penalty)
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        return sample_top_p(logits, p.temperature, p.top_p, self._rng)


def apply_repeat_penalty(logits: npt.NDArray[np.float32], recent: Iterable[int], penalty: float) -> None:
    """llama.cpp's repetition penalty: each distinct recent token's logit is divided by `penalty` when
    positive and multiplied when negative (how often it occurred does not matter)."""
    ids = np.fromiter(set(recent), dtype=np.int64)
    if ids.size == 0:
        return
    vals = logits[ids]
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


def sample_top_p(logits: npt.NDArray[np.float32], temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Sample from softmax(logits / temperature) restricted to the smallest top set with mass >= top_p."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p >= 1.0:
        return int(rng.choice(probs.size, p=probs))
    k = min(_TOP_P_CANDIDATES, probs.size)
    cand = np.argpartition(probs, -k)[-k:] if k < probs.size else np.arange(probs.size)
    order = cand[np.argsort(probs[cand])[::-1]]
    cum = np.cumsum(probs[order])
    if cum[-1] < top_p and k < probs.size:  # the nucleus is wider than the candidates: sort everything
        order = np.argsort(probs)[::-1]
        cum = np.cumsum(probs[order])
    # Keep tokens up to and including the one that crosses top_p (at least one).
    n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1
    keep = order[: min(n_keep, order.size)]
    kept = probs[keep]
    return int(keep[rng.choice(keep.size, p=kept / kept.sum())])
