"""Factories of the built-in backends whose classes take other arguments: `local`, `openai` and `azure`.

Each is registered under its name in the `sot.backends` entry-point group (see `sot.backends.registry`). Unset
settings come from the usual environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sot.backends.base import Backend
from sot.backends.registry import Capabilities, backend_factory
from sot.errors import ConfigError


@backend_factory(
    capabilities=Capabilities(prefill=True, prompt_cache=True, batching=True, concurrent=True),
    description="The embedded llama.cpp engine (default model: the packaged SmolLM2-135M-Instruct), offline.",
    requires=("llama_cpp",),
    install_hint="pip install llama-cpp-python",
)
def local(
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    weights: str = "auto",
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Backend:
    """`model` is a GGUF path (default: the packaged model); options go to `LocalBackend`; `base_url` is unused."""
    from sot.backends.local import LocalBackend

    if progress is not None:
        options["progress"] = progress
    return LocalBackend(model or None, weights=weights, **options)  # type: ignore[arg-type]  # checked there


def _openai_model(name: str, model: str | None) -> str:
    model = model or os.environ.get("SOT_MODEL") or os.environ.get("OPENAI_MODEL")
    if not model:
        raise ConfigError(f"the {name} backend needs --model (or SOT_MODEL)")
    return model


@backend_factory(
    capabilities=Capabilities(
        prefill=False,
        prompt_cache=True,
        notes="prefill with --continue-final-message (vLLM, SGLang, llama.cpp); prompt_cache_key on OpenAI",
    ),
    description="Any OpenAI-compatible chat-completions endpoint: OpenAI, vLLM, SGLang, llama.cpp server, Ollama.",
)
def openai(
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    continue_final_message: bool = False,
    **options: Any,
) -> Backend:
    """`model` is required (or SOT_MODEL); `base_url` defaults to OPENAI_BASE_URL, else OpenAI itself."""
    from sot.backends.openai_compat import OpenAIBackend

    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    if base_url is None:
        options.setdefault("cache_key_field", "prompt_cache_key")  # OpenAI itself takes it
    return OpenAIBackend(
        _openai_model("openai", model),
        base_url=base_url,
        api_key=api_key,
        name="openai",
        continue_final_message=continue_final_message,
        **options,
    )


@backend_factory(
    capabilities=Capabilities(prefill=False, prompt_cache=True, notes="automatic prefix caching"),
    description="Azure OpenAI (--base-url https://NAME.openai.azure.com, --model DEPLOYMENT).",
)
def azure(
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    continue_final_message: bool = False,
    **options: Any,
) -> Backend:
    """`base_url` defaults to AZURE_OPENAI_ENDPOINT, the API version to OPENAI_API_VERSION (else 2024-10-21)."""
    from sot.backends.openai_compat import OpenAIBackend

    options.setdefault("azure_api_version", os.environ.get("OPENAI_API_VERSION", "2024-10-21"))
    return OpenAIBackend(
        _openai_model("azure", model),
        base_url=base_url or os.environ.get("AZURE_OPENAI_ENDPOINT"),
        api_key=api_key,
        name="azure",
        continue_final_message=continue_final_message,
        **options,
    )
