"""Command-line options shared by every command that talks to a model, and building an engine from them."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sot.backends import BACKENDS, Backend, create_backend
from sot.core.prompts import BUILTIN, PromptSet, load_prompt_set
from sot.engine import Engine, EngineConfig, RetryPolicy, recommended_sampling
from sot.errors import ConfigError, SoTError

F = TypeVar("F", bound=Callable[..., Any])


def backend_options(func: F) -> F:
    """--backend, --model, --base-url, --api-key and the backend-specific switches."""
    options = [
        click.option(
            "--backend",
            "-b",
            type=click.Choice(BACKENDS, case_sensitive=False),
            envvar="SOT_BACKEND",
            default="local",
            show_default=True,
            help="Model backend: the embedded engine, or an OpenAI-compatible endpoint.",
        ),
        click.option("--model", "-m", envvar="SOT_MODEL", help="Model name (openai/azure) or GGUF file path (local)."),
        click.option(
            "--base-url",
            envvar="OPENAI_BASE_URL",
            help="OpenAI-compatible endpoint, e.g. http://host:8000/v1.",
        ),
        click.option("--api-key", envvar="OPENAI_API_KEY", help="API key (default: $OPENAI_API_KEY)."),
        click.option(
            "--continue-final-message/--no-continue-final-message",
            default=False,
            help="Upstream continues a final assistant message (vLLM, SGLang, llama.cpp): use prefill prompts.",
        ),
        click.option(
            "--weights",
            type=click.Choice(["auto", "bf16", "f16", "q8_0", "q4_1"]),
            default="auto",
            show_default=True,
            help="Local engine: weight format, re-encoded once into a cache (auto: bf16 where the CPU has BF16 dot "
            "products, else f16).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def generation_options(func: F) -> F:
    """Sampling and SoT shape options."""
    options = [
        click.option("--max-tokens", type=click.IntRange(1, 32768), help="Token budget of a normal answer."),
        click.option("--point-max-tokens", type=click.IntRange(1, 8192), help="Token budget of each point."),
        click.option("--temperature", type=click.FloatRange(0.0, 2.0), help="Sampling temperature (0 = greedy)."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), help="Nucleus sampling mass."),
        click.option("--repeat-penalty", type=click.FloatRange(0.5, 2.0), help="Repetition penalty (local)."),
        click.option("--seed", type=int, help="Sampling seed."),
        click.option(
            "--max-points",
            type=click.IntRange(2, 50),
            default=10,
            show_default=True,
            help="Cap on skeleton points.",
        ),
        click.option(
            "--max-parallel",
            type=click.IntRange(1, 256),
            default=16,
            show_default=True,
            help="Points expanded at once.",
        ),
        click.option(
            "--skeleton-deadline",
            type=click.FloatRange(0.1),
            default=EngineConfig.skeleton_deadline,
            show_default=True,
            help="Seconds allowed for the skeleton.",
        ),
        click.option(
            "--point-deadline",
            type=click.FloatRange(0.1),
            default=EngineConfig.point_deadline,
            show_default=True,
            help="Seconds allowed per point, its retries included.",
        ),
        click.option(
            "--normal-deadline",
            type=click.FloatRange(0.1),
            default=EngineConfig.normal_deadline,
            show_default=True,
            help="Seconds allowed for a normal answer (also SoT's fallback).",
        ),
        click.option(
            "--run-deadline",
            type=click.FloatRange(0.1),
            default=EngineConfig.run_deadline,
            show_default=True,
            help="Seconds allowed for the whole question.",
        ),
        click.option(
            "--stall-timeout",
            type=click.FloatRange(0.1),
            default=EngineConfig.stall_timeout,
            show_default=True,
            help="End a request that sends nothing for this many seconds (the first token included).",
        ),
        click.option(
            "--max-attempts",
            type=click.IntRange(1, 10),
            default=RetryPolicy.max_attempts,
            show_default=True,
            help="Attempts per request (transient errors only: connection, timeout, 408/409/429/5xx).",
        ),
        click.option(
            "--retry-budget",
            type=click.IntRange(0, 100),
            default=RetryPolicy.budget,
            show_default=True,
            help="Extra requests one question may spend on retries, over all its stages.",
        ),
        click.option(
            "--overlap/--no-overlap",
            default=None,
            help="Start expanding each point as soon as its skeleton line is complete.",
        ),
        click.option(
            "--prompts",
            "prompts_source",
            help=f"Prompt set: a built-in name ({', '.join(BUILTIN)}) or a JSON file (ours or the paper's format).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_backend(params: dict[str, Any], *, progress: Callable[[str], None] | None = None) -> Backend:
    """The backend named by the common options."""
    name = params["backend"]
    options: dict[str, Any] = {}
    if name == "local":
        options["weights"] = params.get("weights") or "auto"
        if progress is not None:
            options["progress"] = progress
    elif name in ("openai", "azure"):
        options["continue_final_message"] = bool(params.get("continue_final_message"))
    return create_backend(
        name,
        model=params.get("model"),
        base_url=params.get("base_url"),
        api_key=params.get("api_key"),
        **options,
    )


def load_prompts(source: str | None) -> PromptSet | None:
    """A built-in prompt set, or one read from a file; `None` lets the engine choose by backend."""
    if not source:
        return None
    if source in BUILTIN:
        return BUILTIN[source]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--prompts: {source!r} is neither a built-in set ({', '.join(BUILTIN)}) nor a file")
    return load_prompt_set(path.read_text(encoding="utf-8"), name=path.stem)


def build_engine(backend: Backend, params: dict[str, Any], router: Any = None) -> Engine:
    """An engine with the generation options applied over the backend's recommended sampling."""
    base = recommended_sampling(backend)
    overrides = {
        key: params[opt]
        for key, opt in (
            ("max_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("repeat_penalty", "repeat_penalty"),
            ("seed", "seed"),
        )
        if params.get(opt) is not None
    }
    sampling = dataclasses.replace(base, **overrides)
    config = EngineConfig(
        sampling=sampling,
        prompts=load_prompts(params.get("prompts_source")),
        max_points=params.get("max_points") or 10,
        max_parallel=params.get("max_parallel") or 16,
        skeleton_deadline=params.get("skeleton_deadline") or EngineConfig.skeleton_deadline,
        point_deadline=params.get("point_deadline") or EngineConfig.point_deadline,
        normal_deadline=params.get("normal_deadline") or EngineConfig.normal_deadline,
        run_deadline=params.get("run_deadline") or EngineConfig.run_deadline,
        stall_timeout=params.get("stall_timeout") or EngineConfig.stall_timeout,
        retry=RetryPolicy(
            max_attempts=params.get("max_attempts") or RetryPolicy.max_attempts,
            budget=RetryPolicy.budget if params.get("retry_budget") is None else params["retry_budget"],
        ),
        point_max_tokens=params.get("point_max_tokens") or EngineConfig.point_max_tokens,
        overlap=EngineConfig.overlap if params.get("overlap") is None else bool(params["overlap"]),
    )
    return Engine(backend, config, router=router)


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error (no traceback) and exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn the project's errors into clean one-line messages and exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, click.BadParameter) as exc:
            fail(str(exc), 2)
        except SoTError as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]
