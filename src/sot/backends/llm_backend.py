"""The `llm` backend: any model of Simon Willison's `llm` tool (`-b llm -m MODEL_ID`), with the user's plugins and keys.

Prompts are instruction-style (`llm` has no way to continue a started reply). A request's conversation goes
to the model as an `llm` conversation, or as a written-out transcript for a model without conversations
(`sot.backends.llm_conversation`). The engine's sampling settings go to the model as options where its
options have those names (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`); `options` adds any other.
Stop strings and the token budget are also applied here, on the streamed text, for models without them.

An async model is streamed natively and concurrently. A sync-only model runs in a worker thread, and one call
at a time per model object (a local model is rarely safe to call from two threads; `concurrency` raises the
limit for one that is): the backend then says `concurrent = False`, `sot` expands the points one after
another (`max_parallel` 1 in the CLI), and `counters()` reports `serialized_calls` and the time calls waited
(`lock_wait_seconds`), which the engine puts in `Result.stats.backend`. Errors map to `sot.errors`: a missing
key is `AuthenticationError`, the `openai` and `anthropic` SDKs' errors (which many plugins raise) as for
those backends, an HTTP library's error is a `BackendConnectionError`, `llm.ModelError` a `BackendError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from sot.backends.base import Chunk, GenerationRequest, Usage, is_transport_error
from sot.backends.llm_conversation import build_prompt, split_turns
from sot.backends.registry import Capabilities
from sot.core.stops import StopHoldback
from sot.errors import AuthenticationError, BackendConnectionError, BackendError, ConfigError

INSTALL_HINT = "pip install 'sot[llm]'  (or: pip install llm, and `llm install` the plugin of your model)"
# The engine's sampling settings, and the names llm plugins commonly give them.
_OPTION_NAMES = {
    "max_tokens": ("max_tokens", "max_output_tokens", "max_new_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "seed": ("seed",),
}
_POLL = 0.05  # seconds between checks of a cancelled call that waits for the model


def _llm() -> Any:
    """The `llm` module, or a `ConfigError` that says how to install it."""
    try:
        import llm
    except ImportError as exc:
        raise ConfigError(f"the llm backend needs Simon Willison's llm: {INSTALL_HINT}") from exc
    return llm


def resolve_model(llm: Any, model_id: str) -> tuple[Any, bool]:
    """(model, is_async): the async variant when `llm` has one, else the sync one."""
    try:
        return llm.get_async_model(model_id), True
    except llm.UnknownModelError:
        pass
    try:
        return llm.get_model(model_id), False
    except llm.UnknownModelError as exc:
        raise ConfigError(
            f"llm knows no model {model_id!r} ({exc.args[0] if exc.args else exc}); `llm models` lists them, "
            "and `llm install PLUGIN` adds more"
        ) from None


def map_llm_error(exc: BaseException, backend: str) -> BackendError | None:
    """The `sot.errors` class of an error raised while a model ran, or None to let it through."""
    llm = _llm()
    if isinstance(exc, llm.NeedsKeyException):
        return AuthenticationError(f"the model needs an API key: {exc}", status_code=401, backend=backend)
    try:
        import openai

        from sot.backends.openai_compat import map_openai_error

        if isinstance(exc, openai.OpenAIError):
            return map_openai_error(exc, backend)
    except ImportError:  # pragma: no cover - openai is a dependency of sot
        pass
    try:
        import anthropic

        from sot.backends.anthropic import map_anthropic_error

        if isinstance(exc, anthropic.AnthropicError):
            return map_anthropic_error(exc, backend)
    except ImportError:
        pass
    if is_transport_error(exc):
        return BackendConnectionError(f"the model's connection failed: {exc!r}", backend=backend)
    if isinstance(exc, llm.ModelError):
        return BackendError(f"the model failed: {exc}", backend=backend)
    return None


class _Sampling:
    """Which of the engine's settings the model takes as options, by the model's own option names."""

    def __init__(self, model: Any, extra: Mapping[str, Any]) -> None:
        options = getattr(model, "Options", None)
        fields = set(getattr(options, "model_fields", {}) or {})
        self.names = {ours: next((n for n in theirs if n in fields), None) for ours, theirs in _OPTION_NAMES.items()}
        self.stop_name = "stop" if "stop" in fields else None
        self.extra = dict(extra)

    def options(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        values = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        out: dict[str, Any] = {}
        for ours, value in values.items():
            theirs = self.names[ours]
            if theirs is not None and value is not None:
                out[theirs] = value
        if self.stop_name and request.stop:
            out[self.stop_name] = list(request.stop)
        out.update(self.extra)
        return out


class _Output:
    """The text of one call on its way to the engine: stop strings and the token budget applied."""

    def __init__(self, request: GenerationRequest) -> None:
        self.cut = StopHoldback(request.stop)
        self.budget = request.sampling.max_tokens
        self.chunks = 0
        self.capped = False

    def push(self, text: str) -> str:
        """The text to send now ("" when held back or past the end); sets `done` when the call can stop."""
        out = self.cut.push(text)
        self.chunks += 1
        if self.chunks >= self.budget:
            self.capped = True
        return out

    @property
    def done(self) -> bool:
        return self.cut.stopped or self.capped

    def finish(self, response: Any) -> tuple[str, Chunk]:
        """The held tail, and the final chunk with the finish reason and whatever usage the model reported."""
        tail = "" if self.cut.stopped else self.cut.flush()
        prompt = getattr(response, "input_tokens", None)
        completion = getattr(response, "output_tokens", None)
        completion = completion if isinstance(completion, int) else self.chunks
        length = not self.cut.stopped and (self.capped or completion >= self.budget)
        usage = Usage(prompt_tokens=prompt if isinstance(prompt, int) else 0, completion_tokens=completion)
        return tail, Chunk(finish_reason="length" if length else "stop", usage=usage)


class _SyncCall:
    """One call of a sync model in its own thread, under the model's lock; its events go to an asyncio queue.

    The thread takes the lock (checking for cancellation while it waits), iterates the response and closes it,
    then releases the lock: the model is never called from two threads at once, even after the caller left.
    """

    def __init__(self, slots: threading.Semaphore, response: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stop = threading.Event()
        self.slots = slots
        self.response = response
        self.waited = 0.0

    def start(self, name: str) -> None:
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _put(self, kind: str, value: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _run(self) -> None:
        began = time.perf_counter()
        while not self.slots.acquire(timeout=_POLL):
            if self.stop.is_set():
                return
        self.waited = time.perf_counter() - began
        try:
            self._put("started")
            chunks = iter(self.response)
            try:
                for text in chunks:
                    self._put("text", text)
                    if self.stop.is_set():
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            self._put("done")
        except BaseException as exc:  # handed to the caller's task, which raises it there
            self._put("error", exc)
        finally:
            self.slots.release()


class LLMBackend:
    """A model of Simon Willison's `llm` (a model id it knows, or a model object)."""

    capabilities = Capabilities(
        prefill=False, concurrent=True, notes="a sync-only model runs one call at a time, points one after another"
    )
    description = "Any model of Simon Willison's llm tool and its plugins (instruction-style prompts)."
    requires = ("llm",)
    install_hint = INSTALL_HINT

    def __init__(
        self,
        model: Any,
        *,
        api_key: str | None = None,
        options: Mapping[str, Any] | None = None,
        concurrency: int | None = None,
        name: str = "llm",
    ) -> None:
        llm = _llm()
        if isinstance(model, str):
            self._model, self.is_async = resolve_model(llm, model)
        else:
            self._model, self.is_async = model, isinstance(model, llm.AsyncModel | llm.AsyncKeyModel)
        self._llm = llm
        self.name = name
        self.model: str = str(getattr(self._model, "model_id", model))
        self.supports_prefill = False
        self.api_key = api_key
        self.sampling = _Sampling(self._model, options or {})
        if concurrency is not None and concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        limit = concurrency or (16 if getattr(self._model, "sot_thread_safe", False) else 1)
        # False: a sync model that takes one call at a time; the engine's points then run one after another.
        self.concurrent = self.is_async or limit > 1
        self._slots = threading.Semaphore(limit)
        self._counters: dict[str, Any] = {"requests": 0, "serialized_calls": 0, "lock_wait_seconds": 0.0}
        self._counters["expansion"] = "concurrent" if self.concurrent else "one call at a time (sync model)"

    @classmethod
    def create(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        options: Mapping[str, Any] | None = None,
        concurrency: int | None = None,
    ) -> LLMBackend:
        """The registry's constructor: `model` defaults to SOT_MODEL, else llm's default model."""
        if base_url:
            raise ConfigError("the llm backend takes no --base-url: configure endpoints in llm itself")
        model = model or os.environ.get("SOT_MODEL") or _llm().get_default_model()
        return cls(model, api_key=api_key, options=options, concurrency=concurrency)

    def counters(self) -> dict[str, Any]:
        """Calls so far, how many ran one at a time, and how long they waited for the model."""
        return dict(self._counters)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Run one prompt, streaming its text; a sync model's call runs in a worker thread."""
        response = build_prompt(
            self._llm,
            self._model,
            split_turns(request),
            self.sampling.options(request),
            is_async=self.is_async,
            key=self.api_key,
        )
        output = _Output(request)
        self._counters["requests"] += 1
        chunks = self._async_chunks(response) if self.is_async else self._sync_chunks(response)
        try:
            async for text in chunks:
                if text is None:
                    yield Chunk()  # the model took the call
                    continue
                if piece := output.push(text):
                    yield Chunk(text=piece)
                if output.done:
                    break
        except BackendError:
            raise
        except Exception as exc:
            mapped = map_llm_error(exc, self.name)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            await chunks.aclose()
        tail, last = output.finish(response)
        if tail:
            yield Chunk(text=tail)
        yield last

    async def _async_chunks(self, response: Any) -> AsyncGenerator[str | None, None]:
        """An async model's text, natively; the plugin's generator is closed when the caller stops early."""
        try:
            async for text in response:
                yield text
        finally:
            generator = getattr(response, "_generator", None)
            if generator is not None:
                await generator.aclose()

    async def _sync_chunks(self, response: Any) -> AsyncGenerator[str | None, None]:
        """A sync model's text from its worker thread; None once the call has the model."""
        call = _SyncCall(self._slots, response)
        call.start(f"sot-llm-{self.model}")
        try:
            while True:
                kind, value = await call.queue.get()
                if kind == "started":
                    if not self.concurrent:
                        self._counters["serialized_calls"] += 1
                    self._counters["lock_wait_seconds"] += call.waited
                    yield None
                elif kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            call.stop.set()

    async def aclose(self) -> None:
        return None
