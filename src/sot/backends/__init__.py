"""Backends: the `Backend` protocol, and `create_backend`, which builds one by name.

Built-in names: `local` (the embedded llama.cpp engine, default), `openai` (any OpenAI-compatible
endpoint), `azure` (Azure OpenAI), `scripted` (an in-process test double).
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
from sot.errors import ConfigError

BACKENDS = ("local", "openai", "azure", "scripted")


def create_backend(
    name: str | None = None,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **options: Any,
) -> Backend:
    """Build a backend by name; unspecified settings come from the usual environment variables.

    `local`: `model` is a GGUF path (default: the packaged SmolLM2-135M-Instruct); options go to
    `LocalBackend` (e.g. `weights`). `openai`: `model` is required (or `SOT_MODEL`), `base_url` defaults
    to `OPENAI_BASE_URL` or OpenAI itself; options go to `OpenAIBackend` (e.g. `continue_final_message`).
    """
    name = (name or os.environ.get("SOT_BACKEND") or "local").lower()
    if name == "local":
        from sot.backends.local import LocalBackend

        return LocalBackend(model or None, **options)
    if name in ("openai", "azure"):
        from sot.backends.openai_compat import OpenAIBackend

        model = model or os.environ.get("SOT_MODEL") or os.environ.get("OPENAI_MODEL")
        if not model:
            raise ConfigError(f"the {name} backend needs --model (or SOT_MODEL)")
        if name == "azure":
            options.setdefault("azure_api_version", os.environ.get("OPENAI_API_VERSION", "2024-10-21"))
            base_url = base_url or os.environ.get("AZURE_OPENAI_ENDPOINT")
        else:
            base_url = base_url or os.environ.get("OPENAI_BASE_URL")
            if base_url is None:
                options.setdefault("cache_key_field", "prompt_cache_key")  # OpenAI itself takes it
        return OpenAIBackend(model, base_url=base_url, api_key=api_key, name=name, **options)
    if name == "scripted":
        from sot.backends.scripted import ScriptedBackend

        return ScriptedBackend(**options)
    raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "Backend",
    "Chunk",
    "FinishReason",
    "GenerationRequest",
    "Message",
    "SamplingParams",
    "Usage",
    "create_backend",
]
