"""SoT-R routers: decide per conversation whether to answer with Skeleton-of-Thought or normal decoding.

Three routers share one protocol (`Router.decide(messages) -> RouteDecision`):
- `trained`: logistic regression over word features and the embedded model's mean-pooled first hidden
  state, shipped as JSON; well under a millisecond a question on CPU; the default for `--mode auto`.
- `heuristic`: readable rules (code, math, step-by-step, short answers, list cues); a fallback and baseline.
- `prompting`: one 4-token call asking the serving model to choose A (independent points), B or C.
All of them read the whole conversation, bounded (`router_input`), and answer normal decoding when unsure.
Scoring a router against labels lives in `sot.router.metrics`; the CLI is `sot.cli.router_cmd`.
"""

from __future__ import annotations

from pathlib import Path

from sot.backends.base import Backend
from sot.errors import ConfigError
from sot.router.base import RouteDecision, Router, RouterInput, router_input
from sot.router.heuristic import HeuristicRouter
from sot.router.prompting import PromptingRouter, load_router_prompt, parse_router_reply
from sot.router.trained import TrainedModel, TrainedRouter, load_model

ROUTERS = ("trained", "heuristic", "prompting")


def make_router(
    name: str,
    *,
    backend: Backend | None = None,
    model_path: str | Path | None = None,
    prompt_path: str | Path | None = None,
    words_only: bool = False,
) -> Router:
    """A router by name. `model_path` replaces the packaged trained model; `prompt_path` the default
    routing prompt (JSON with a "prompt" field, e.g. the paper's, or plain text with `{request}`).

    `words_only` makes the trained router skip the embedding model (word features only).

    Raises `ConfigError` for an unknown name, and for `prompting` without a backend.
    """
    key = name.strip().lower()
    if key == "trained":
        return (
            TrainedRouter(load_model(model_path), embedder=None)
            if words_only
            else TrainedRouter(load_model(model_path))
        )
    if key == "heuristic":
        return HeuristicRouter()
    if key == "prompting":
        if backend is None:
            raise ConfigError("the prompting router needs a backend to ask")
        if prompt_path is None:
            return PromptingRouter(backend)
        return PromptingRouter(backend, prompt=load_router_prompt(prompt_path))
    raise ConfigError(f"unknown router {name!r}; choose one of: {', '.join(ROUTERS)}")


__all__ = [
    "ROUTERS",
    "HeuristicRouter",
    "PromptingRouter",
    "RouteDecision",
    "Router",
    "RouterInput",
    "TrainedModel",
    "TrainedRouter",
    "load_model",
    "load_router_prompt",
    "make_router",
    "parse_router_reply",
    "router_input",
]
