"""Command-line options shared by every command that talks to a model, and building an engine from them."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from sot.backends import Backend
from sot.backends.registry import lookup
from sot.core.prompts import BUILTIN, PromptSet, load_prompt_set
from sot.engine import Engine, EngineConfig, RetryPolicy, recommended_sampling
from sot.errors import ConfigError, SoTError

F = TypeVar("F", bound=Callable[..., Any])


def backend_options(func: F) -> F:
    """--backend (any registered name), --model, --base-url, --api-key, --backend-option and the switches that
    some backends take (each goes only to a backend whose factory names it)."""
    options = [
        click.option(
            "--backend",
            "-b",
            envvar="SOT_BACKEND",
            default="local",
            show_default=True,
            help="Model backend: any installed one (`sot backends` lists them): local, openai, azure, anthropic, "
            "llm, or a plugin's.",
        ),
        click.option(
            "--model",
            "-m",
            envvar="SOT_MODEL",
            help="Model: a name (openai, azure, anthropic), an llm model id (llm) or a GGUF file path (local).",
        ),
        click.option(
            "--base-url",
            envvar="OPENAI_BASE_URL",
            help="Endpoint, e.g. http://host:8000/v1 (OpenAI-compatible) or an Anthropic-compatible root.",
        ),
        click.option(
            "--api-key",
            envvar="OPENAI_API_KEY",
            help="API key (default: the backend's own variable, e.g. $OPENAI_API_KEY, $ANTHROPIC_API_KEY).",
        ),
        click.option(
            "--backend-option",
            "-O",
            "backend_option",
            multiple=True,
            metavar="KEY=VALUE",
            help="A backend-specific setting, repeatable; VALUE is read as JSON when it parses (true, 3, "
            '{"a": 1}), else as text. E.g. -O prefill=false (anthropic), -O options=\'{"max_tokens": 200}\' (llm).',
        ),
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


def _deadline(flag: str, field: str, what: str) -> Callable[[F], F]:
    return click.option(
        flag, type=click.FloatRange(0.1), default=getattr(EngineConfig, field), show_default=True, help=what
    )


SAMPLING_OPTIONS = [
    click.option("--max-tokens", type=click.IntRange(1, 32768), help="Token budget of a normal answer."),
    click.option("--point-max-tokens", type=click.IntRange(1, 8192), help="Token budget of each point."),
    click.option("--temperature", type=click.FloatRange(0.0, 2.0), help="Sampling temperature (0 = greedy)."),
    click.option("--top-p", type=click.FloatRange(0.0, 1.0), help="Nucleus sampling mass."),
    click.option("--repeat-penalty", type=click.FloatRange(0.5, 2.0), help="Repetition penalty (local)."),
    click.option("--seed", type=int, help="Sampling seed."),
]
SHAPE_OPTIONS = [
    click.option(
        "--max-points", type=click.IntRange(2, 50), default=10, show_default=True, help="Cap on skeleton points."
    ),
    click.option(
        "--max-parallel", type=click.IntRange(1, 256), default=16, show_default=True, help="Points expanded at once."
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
LIMIT_OPTIONS = [
    _deadline("--skeleton-deadline", "skeleton_deadline", "Seconds allowed for the skeleton."),
    _deadline("--point-deadline", "point_deadline", "Seconds allowed per point, its retries included."),
    _deadline("--normal-deadline", "normal_deadline", "Seconds allowed for a normal answer (also SoT's fallback)."),
    _deadline("--run-deadline", "run_deadline", "Seconds allowed for the whole question."),
    _deadline(
        "--stall-timeout",
        "stall_timeout",
        "End a request that sends nothing for this many seconds (the first token included).",
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
]


def generation_options(func: F) -> F:
    """Sampling, SoT shape, and deadline and retry options, in that order in --help."""
    for option in reversed([*SAMPLING_OPTIONS, *SHAPE_OPTIONS, *LIMIT_OPTIONS]):
        func = option(func)
    return func


# Switches that go to a backend only if its factory names them as parameters.
_SWITCHES = ("continue_final_message", "weights")
# Options whose environment variables belong to the OpenAI SDK: another backend does not get their values.
_OPENAI_ENV = ("base_url", "api_key")


def parse_backend_options(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE settings as a dict, each VALUE read as JSON when it parses and as text otherwise."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--backend-option {item!r}: expected KEY=VALUE, e.g. prefill=false")
        try:
            parsed[key] = json.loads(raw)
        except ValueError:
            parsed[key] = raw
    return parsed


def _from_openai_env(option: str) -> bool:
    """Whether `option`'s value came from an OpenAI environment variable rather than the command line."""
    context = click.get_current_context(silent=True)
    if context is None or option not in _OPENAI_ENV:
        return False
    return context.get_parameter_source(option) == click.core.ParameterSource.ENVIRONMENT


def build_backend(params: dict[str, Any], *, progress: Callable[[str], None] | None = None) -> Backend:
    """The backend named by the common options, built through the registry (`sot.backends.registry`).

    `--model`, `--base-url` and `--api-key` go to every backend (the last two only from the command line, not
    from the OpenAI variables, unless the backend is openai or azure); a switch such as `--weights` goes to a
    backend whose factory takes it, and so does `progress`; `--backend-option` settings go as given.
    """
    entry = lookup(params.get("backend") or "local")
    openai_style = entry.name in ("openai", "azure")
    generic: dict[str, Any] = {"model": params.get("model")}
    for option in _OPENAI_ENV:
        value = params.get(option)
        generic[option] = None if value and not openai_style and _from_openai_env(option) else value
    options: dict[str, Any] = {}
    for switch in _SWITCHES:
        if switch in params and entry.accepts(switch):
            options[switch] = params[switch]
    if progress is not None and entry.accepts("progress"):
        options["progress"] = progress
    options.update(parse_backend_options(params.get("backend_option") or ()))
    return entry.create(**{**generic, **options})


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
        max_parallel=_max_parallel(backend, params.get("max_parallel") or 16),
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


def _max_parallel(backend: Backend, requested: int) -> int:
    """Points expanded at once: 1 for a backend that runs one call at a time (`concurrent` False), so that each
    point's deadline counts from its own start rather than from a wait in the backend's queue."""
    return 1 if getattr(backend, "concurrent", True) is False else requested


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
