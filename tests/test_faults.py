"""The fault matrix: every fault a backend can throw, at every stage, in every mode, ends in bounded time in a
`Result` or a typed `sot.errors` exception, and leaves no task running and no stream open."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Sequence

import pytest

from sot.backends.base import Chunk, GenerationRequest, Usage
from sot.engine import Engine, EngineConfig, RetryPolicy
from sot.errors import (
    AuthenticationError,
    BackendCapacityError,
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendStreamError,
    BackendTimeoutError,
    BadRequestError,
    RateLimitError,
    SoTError,
)
from sot.events import Result
from sot.router.prompting import DEFAULT_ROUTER_PROMPT, PromptingRouter

QUESTION = "How can I sleep better?"
ROUTE_MARKER = DEFAULT_ROUTER_PROMPT[:60]
_POINT_PREFILL = re.compile(r"^(\d+)\. .+:$")


def _raiser(make):  # type: ignore[no-untyped-def]
    return make


FAULTS: dict[str, object] = {
    "BackendError": lambda: BackendError("generic failure", backend="faulty"),
    "BackendConnectionError": lambda: BackendConnectionError("refused", backend="faulty"),
    "BackendTimeoutError": lambda: BackendTimeoutError("upstream timed out", backend="faulty"),
    "BackendStatusError": lambda: BackendStatusError("upstream answered 500", status_code=500, backend="faulty"),
    "AuthenticationError": lambda: AuthenticationError("upstream answered 401", status_code=401, backend="faulty"),
    "RateLimitError": lambda: RateLimitError("upstream answered 429", retry_after=0.05, backend="faulty"),
    "BadRequestError": lambda: BadRequestError("upstream answered 400", status_code=400, backend="faulty"),
    "BackendStreamError": lambda: BackendStreamError("stream broke", backend="faulty"),
    "BackendCapacityError": lambda: BackendCapacityError("no room", backend="faulty"),
    "ValueError": lambda: ValueError("a plugin's own error"),
    "RuntimeError": lambda: RuntimeError("a plugin's own error"),
    "CancelledError": lambda: asyncio.CancelledError(),
    "TimeoutError": lambda: TimeoutError("builtin timeout"),
    "empty stream": None,
    "no finish_reason": None,
    "stall before first token": None,
    "stall mid-stream": None,
}
REFUSALS = ("AuthenticationError", "RateLimitError", "BadRequestError")
STAGES_BY_MODE = {
    "normal": ("normal answer",),
    "sot": ("skeleton", "one point", "all points", "fallback answer"),
    "auto": ("routing", "skeleton", "one point", "all points", "normal answer", "fallback answer"),
}
CELLS = [(fault, stage, mode) for mode, stages in STAGES_BY_MODE.items() for stage in stages for fault in FAULTS]

CONFIG = EngineConfig(
    route_deadline=0.5,
    skeleton_deadline=0.8,
    point_deadline=0.8,
    normal_deadline=0.8,
    run_deadline=2.5,
    stall_timeout=0.3,
    retry=RetryPolicy(max_attempts=3, budget=4, base_delay=0.01, max_delay=0.05),
)
BOUND = CONFIG.run_deadline + 0.5


class FaultyBackend:
    """Answers like a small model, but injects `fault` into every request of `stage`; counts open streams."""

    name = "faulty"
    model = "faulty-model"
    supports_prefill = True

    def __init__(self, fault: str, stage: str) -> None:
        self.fault = fault
        self.stage = stage
        self.open_streams = 0
        self.requests: list[str] = []
        self.saw_skeleton = False

    def classify(self, request: GenerationRequest) -> str:
        last = request.messages[-1].content
        if last.startswith(ROUTE_MARKER):
            return "routing"
        if "skeleton" in last.lower():
            self.saw_skeleton = True
            return "skeleton"
        match = _POINT_PREFILL.match(request.prefill)
        if match:
            return f"point {match.group(1)}"
        return "fallback answer" if self.saw_skeleton else "normal answer"

    def hit(self, kind: str) -> bool:
        if self.stage == "one point":
            return kind == "point 2"
        if self.stage == "all points":
            return kind.startswith("point ")
        return kind == self.stage

    def answer(self, kind: str) -> str:
        if kind == "routing":
            return "B" if self.stage == "normal answer" else "A"  # the prompting router's choice
        if kind == "skeleton":
            # For the fallback stage, a skeleton too short for SoT, so that the fallback answer is asked for.
            return " Only one point\n\n" if self.stage == "fallback answer" else " Sleep\n2. Eat well\n3. Move\n\n"
        if kind.startswith("point "):
            return " A short explanation of this point."
        return "A plain answer in a few words."

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        kind = self.classify(request)
        self.requests.append(kind)
        self.open_streams += 1
        try:
            words = re.findall(r"\S*\s*", self.answer(kind))
            words = [w for w in words if w]
            if self.hit(kind):
                async for chunk in self._faulty(words):
                    yield chunk
                return
            for word in words:
                await asyncio.sleep(0)
                yield Chunk(text=word)
            yield Chunk(finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=len(words)))
        finally:
            self.open_streams -= 1

    async def _faulty(self, words: Sequence[str]) -> AsyncGenerator[Chunk, None]:
        make = FAULTS[self.fault]
        if callable(make):
            raise make()
        if self.fault == "empty stream":
            return
        if self.fault == "no finish_reason":
            for word in words:
                yield Chunk(text=word)
            return
        if self.fault == "stall mid-stream":
            yield Chunk(text=words[0])
        await asyncio.sleep(3600)  # stall until cancelled
        yield Chunk(finish_reason="stop")

    async def aclose(self) -> None:
        return None


async def run_cell(fault: str, stage: str, mode: str) -> tuple[Result | SoTError, FaultyBackend, float]:
    backend = FaultyBackend(fault, stage)
    router = PromptingRouter(backend, timeout=CONFIG.route_deadline)
    engine = Engine(backend, CONFIG, router=router)
    started = time.perf_counter()
    outcome: Result | SoTError
    try:
        outcome = await engine.run(QUESTION, mode)  # type: ignore[arg-type]
    except SoTError as exc:
        outcome = exc
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0)  # let cancelled tasks finish their clean-up
    return outcome, backend, elapsed


@pytest.mark.parametrize(("fault", "stage", "mode"), CELLS, ids=[f"{m}-{s}-{f}" for f, s, m in CELLS])
async def test_every_fault_ends_in_a_result_or_a_typed_error(fault: str, stage: str, mode: str) -> None:
    outcome, backend, elapsed = await run_cell(fault, stage, mode)
    assert elapsed < BOUND, f"took {elapsed:.2f} s"
    assert backend.open_streams == 0
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not others, others
    assert any(backend.hit(kind) for kind in backend.requests), "the fault was never injected"

    if stage in ("normal answer", "fallback answer"):
        assert isinstance(outcome, BackendError), outcome
    elif stage == "routing":
        assert isinstance(outcome, Result) and outcome.complete and outcome.mode_used == "normal"
        assert outcome.route is not None and outcome.route.mode == "normal" and "rout" in outcome.route.reason
    elif stage == "skeleton" and fault in REFUSALS:
        assert type(outcome).__name__ == fault  # a refusal is not amplified by a fallback request
        assert "fallback answer" not in backend.requests
    elif stage == "skeleton":
        assert isinstance(outcome, Result) and outcome.mode_used == "normal" and outcome.complete
        assert outcome.fallback_reason is not None and "skeleton" in outcome.fallback_reason
    else:  # a point failed for good: SoT falls back, and says so
        assert isinstance(outcome, Result) and outcome.mode_used == "normal" and outcome.complete
        assert outcome.fallback_reason is not None and outcome.fallback_reason.startswith("point ")
    if isinstance(outcome, BackendError) and fault.startswith("stall"):
        assert isinstance(outcome, BackendTimeoutError)
        assert "stall_timeout" in str(outcome) or "deadline" in str(outcome)
