"""The backend registry: names mapped to factories, from the `sot.backends` entry-point group and the built-ins.

A backend package registers itself in its `pyproject.toml`, as `sot` registers its own backends::

    [project.entry-points."sot.backends"]
    echo = "sot_echo:EchoBackend"

The target is either a class with a `create` classmethod or any callable; both are called with the keyword
arguments `model`, `base_url` and `api_key` (each may be None) plus backend-specific options, and return an
object implementing `sot.backends.base.Backend`. The target may say what the backend can do with a
`capabilities` attribute (a `Capabilities`, or a dict of its fields), and name the modules it needs with
`requires` (and `install_hint`, shown when one is missing).

The built-in backends are listed here too, so they work even when the installed package metadata is stale
(an editable install made before a backend was added); a third-party entry point cannot take a built-in
name (it is listed as shadowed). Entry points are read once per process (`refresh()` reads them again).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sot.backends.base import Backend
from sot.errors import ConfigError

ENTRY_POINT_GROUP = "sot.backends"

# name -> "module:attribute", the same targets as the [project.entry-points."sot.backends"] table of sot.
BUILTIN_TARGETS: dict[str, str] = {
    "local": "sot.backends.builtins:local",
    "openai": "sot.backends.builtins:openai",
    "azure": "sot.backends.builtins:azure",
    "anthropic": "sot.backends.anthropic:AnthropicBackend",
    "llm": "sot.backends.llm_backend:LLMBackend",
    "scripted": "sot.backends.scripted:ScriptedBackend",
}


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do that SoT cares about.

    `prefill`: it continues a started assistant reply, so prefill-style prompts are used (points start
    exactly with "3. <point>:"). `prompt_cache`: a prefix shared by requests (the skeleton conversation of
    all points of a question) is processed once. `batching`: concurrent requests are decoded in one batch.
    `concurrent`: requests run at the same time; when False, points are expanded one after another.
    `notes`: conditions, in a few words ("prefill with --continue-final-message").
    """

    prefill: bool = False
    prompt_cache: bool = False
    batching: bool = False
    concurrent: bool = True
    notes: str = ""

    @classmethod
    def of(cls, value: object) -> Capabilities | None:
        """`value` as capabilities: a `Capabilities`, a dict of its fields (unknown keys ignored), else None."""
        if isinstance(value, Capabilities):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in value.items() if k in known})
        return None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class BackendFactory:
    """A function that builds a backend, with what the registry shows about it (see `backend_factory`)."""

    def __init__(
        self,
        func: Callable[..., Backend],
        *,
        capabilities: Capabilities,
        description: str = "",
        requires: tuple[str, ...] = (),
        install_hint: str = "",
    ) -> None:
        self.func = func
        self.capabilities = capabilities
        self.description = description or (inspect.getdoc(func) or "").split("\n", 1)[0]
        self.requires = requires
        self.install_hint = install_hint
        functools.update_wrapper(self, func)

    def __call__(self, **kwargs: Any) -> Backend:
        return self.func(**kwargs)


def backend_factory(
    *, capabilities: Capabilities, description: str = "", requires: tuple[str, ...] = (), install_hint: str = ""
) -> Callable[[Callable[..., Backend]], BackendFactory]:
    """Decorate a function `(*, model, base_url, api_key, **options) -> Backend` as a registrable factory."""

    def wrap(func: Callable[..., Backend]) -> BackendFactory:
        return BackendFactory(
            func, capabilities=capabilities, description=description, requires=requires, install_hint=install_hint
        )

    return wrap


@dataclass
class BackendEntry:
    """One registered backend name and where its factory lives."""

    name: str
    target: str  # "module:attribute"
    source: str  # "built-in", or the distribution that registered it
    shadowed: list[str] = field(default_factory=list)  # other registrations of this name that were ignored
    _loaded: Any = None

    def load(self) -> Any:
        """The factory object (imported on first use); `ConfigError` if it cannot be imported."""
        if self._loaded is None:
            module_name, _, attribute = self.target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attribute.split(".") if attribute else ():
                    obj = getattr(obj, part)
            except Exception as exc:
                raise ConfigError(
                    f"the {self.name} backend ({self.target}, from {self.source}) cannot be loaded: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._loaded = obj
        return self._loaded

    def capabilities(self) -> Capabilities | None:
        return Capabilities.of(getattr(self.load(), "capabilities", None))

    def description(self) -> str:
        obj = self.load()
        text = getattr(obj, "description", None)
        if isinstance(text, str) and text:
            return text
        return (inspect.getdoc(obj) or "").split("\n", 1)[0]

    def missing(self) -> str | None:
        """What must be installed before this backend can work, or None when nothing is missing."""
        obj = self.load()
        requires = getattr(obj, "requires", ()) or ()
        absent = [name for name in requires if not _installed(name)]
        if not absent:
            return None
        hint = getattr(obj, "install_hint", "") or f"pip install {' '.join(absent)}"
        return f"needs {', '.join(absent)}: {hint}"

    def constructor(self) -> Callable[..., Any]:
        """What is called to build a backend: the target's `create` classmethod, or the target itself."""
        obj = self.load()
        create = getattr(obj, "create", None) if inspect.isclass(obj) else None
        if callable(create):
            return create
        if not callable(obj):
            raise ConfigError(f"the {self.name} backend's target {self.target} is not callable")
        return obj

    def accepts(self, option: str) -> bool:
        """Whether the factory names `option` as a parameter (a `**kwargs` catch-all does not count)."""
        try:
            parameters = inspect.signature(self.constructor()).parameters
        except (TypeError, ValueError):
            return False
        parameter = parameters.get(option)
        return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)

    def create(self, **kwargs: Any) -> Backend:
        """Build the backend; a factory that rejects the options or returns no backend is a `ConfigError`."""
        constructor = self.constructor()
        try:
            inspect.signature(constructor).bind(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"the {self.name} backend does not take these options: {exc}") from None
        except ValueError:
            pass  # no signature to check against (a builtin): let the call decide
        backend = constructor(**kwargs)
        if not callable(getattr(backend, "stream", None)):
            raise ConfigError(f"the {self.name} backend's factory returned {type(backend).__name__}, not a backend")
        return backend


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a module blocked in sys.modules, a broken parent package
        return False


@functools.cache
def _registry() -> dict[str, BackendEntry]:
    entries = {name: BackendEntry(name, target, "built-in") for name, target in BUILTIN_TARGETS.items()}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        name = point.name.lower()
        dist = point.dist.name if point.dist is not None else "unknown distribution"
        existing = entries.get(name)
        if existing is None:
            entries[name] = BackendEntry(name, point.value, dist)
        elif point.value != existing.target and f"{dist} ({point.value})" not in existing.shadowed:
            existing.shadowed.append(f"{dist} ({point.value})")
    return dict(sorted(entries.items()))


def registry() -> dict[str, BackendEntry]:
    """Every registered backend by name (lower case), built-ins first in precedence, sorted by name."""
    return _registry()


def refresh() -> None:
    """Read the entry points again (after installing a backend package in this process)."""
    _registry.cache_clear()


def backend_names() -> list[str]:
    """The names of every registered backend, sorted."""
    return list(registry())


def lookup(name: str) -> BackendEntry:
    """The entry of backend `name` (any case); an unknown name is a `ConfigError` listing the installed ones."""
    entry = registry().get(name.strip().lower())
    if entry is None:
        raise ConfigError(
            f"unknown backend: {name!r} is not one of the installed backends: {', '.join(backend_names())} "
            "(`sot backends` lists them with their capabilities)"
        )
    return entry
