"""Backends: the `Backend` protocol, and `create_backend`, which builds one by its registered name.

Backends are registered by name in the `sot.backends` entry-point group (see `sot.backends.registry`); the
built-in ones are `local` (the embedded llama.cpp engine, default), `openai` (any OpenAI-compatible
endpoint), `azure` (Azure OpenAI), `anthropic` (Claude through the official SDK), `llm` (any model of Simon
Willison's `llm` tool) and `scripted` (an in-process test double). `sot backends` lists what is installed.
"""

from __future__ import annotations

import os
from typing import Any

from sot.backends.base import (
    Backend,
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    SamplingParams,
    Usage,
)
from sot.backends.registry import BUILTIN_TARGETS, Capabilities, backend_factory, backend_names, lookup, registry

# The built-in names (every registered name: `backend_names()`).
BACKENDS = tuple(BUILTIN_TARGETS)


def create_backend(
    name: str | None = None,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **options: Any,
) -> Backend:
    """Build a registered backend by name (default: `SOT_BACKEND`, else `local`); options go to its factory.

    `local`: `model` is a GGUF path (default: the packaged SmolLM2-135M-Instruct); options go to
    `LocalBackend` (e.g. `weights`). `openai`: `model` is required (or `SOT_MODEL`), `base_url` defaults
    to `OPENAI_BASE_URL` or OpenAI itself; options go to `OpenAIBackend` (e.g. `continue_final_message`).
    `anthropic`: `model` is required, the key comes from `ANTHROPIC_API_KEY`. `llm`: `model` is any model
    id `llm` knows. An unknown name is a `ConfigError` that lists the installed backends.
    """
    name = name or os.environ.get("SOT_BACKEND") or "local"
    return lookup(name).create(model=model, base_url=base_url, api_key=api_key, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Chunk",
    "FinishReason",
    "GenerationRequest",
    "Message",
    "SamplingParams",
    "Usage",
    "backend_factory",
    "backend_names",
    "create_backend",
    "registry",
]
