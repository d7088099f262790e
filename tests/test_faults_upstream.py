"""The fault matrix through the real `openai` client and `OpenAIBackend`, against the bundled upstream process:
each fault the upstream can inject, at each stage, ends in bounded time in a `Result` or a typed error, and
leaves no request open upstream."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from sot.backends.base import GenerationRequest
from sot.backends.openai_compat import OpenAIBackend
from sot.engine import Engine, EngineConfig, RetryPolicy
from sot.errors import BackendError, BackendTimeoutError, SoTError
from sot.events import Result
from sot.testing.upstream_options import FAULTS as UPSTREAM_FAULTS
from upstream_helpers import async_wait_for_stats

QUESTION = "What are the most effective ways to deal with stress?"
# Every fault the upstream can inject, so a new one joins the matrix; slow headers only delay an answer.
FAULTS = tuple(fault for fault in UPSTREAM_FAULTS if fault != "slow-headers")
REFUSALS = ("429", "401")
STAGES_BY_MODE = {"normal": ("normal answer",), "sot": ("skeleton", "one point", "all points", "fallback answer")}
CELLS = [(fault, stage, mode) for mode, stages in STAGES_BY_MODE.items() for stage in stages for fault in FAULTS]
CONFIG = EngineConfig(
    skeleton_deadline=1.5,
    point_deadline=1.5,
    normal_deadline=1.5,
    run_deadline=4.0,
    stall_timeout=0.4,
    retry=RetryPolicy(max_attempts=2, budget=3, base_delay=0.01, max_delay=0.05),
)


class FaultyStage(OpenAIBackend):
    """Asks the upstream for `fault` on every request of `stage` (its per-request test options)."""

    def __init__(self, base_url: str, fault: str, stage: str) -> None:
        super().__init__("sot-test", base_url=base_url, api_key="test")
        self.fault = fault
        self.stage = stage
        self.saw_skeleton = False

    def kind(self, request: GenerationRequest) -> str:
        last = request.messages[-1].content
        if "skeleton" in last.lower():
            self.saw_skeleton = True
            return "skeleton"
        match = re.search(r"expand point (\d+)", last)
        if match:
            return f"point {match.group(1)}"
        return "fallback answer" if self.saw_skeleton else "normal answer"

    def _payload(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, str]]:
        body, headers = super()._payload(request)
        kind = self.kind(request)
        options: dict[str, Any] = {"retry_after": 0.05}
        if kind == "skeleton" and self.stage == "fallback answer":
            options["points"] = 1  # too short for SoT: the fallback answer is asked for
        hit = (
            kind == self.stage
            or (self.stage == "one point" and kind == "point 2")
            or (self.stage == "all points" and kind.startswith("point "))
        )
        if hit:
            options["fault"] = self.fault
        body["sot_test"] = options
        return body, headers


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "stage", "mode"), CELLS, ids=[f"{m}-{s}-{f}" for f, s, m in CELLS])
async def test_every_upstream_fault_ends_in_a_result_or_a_typed_error(
    upstream: str, fault: str, stage: str, mode: str
) -> None:
    backend = FaultyStage(upstream, fault, stage)
    engine = Engine(backend, CONFIG)
    started = time.perf_counter()
    outcome: Result | SoTError
    try:
        outcome = await engine.run(QUESTION, mode)  # type: ignore[arg-type]
    except SoTError as exc:
        outcome = exc
    elapsed = time.perf_counter() - started
    await backend.aclose()
    assert elapsed < CONFIG.run_deadline + 0.5, f"took {elapsed:.2f} s"
    stats = await async_wait_for_stats(upstream, lambda s: s["active"] == 0, seconds=5.0)
    assert any(r["fault"] == fault for r in stats["requests"]), "the fault was never injected"
    await asyncio.sleep(0)

    if stage in ("normal answer", "fallback answer"):
        assert isinstance(outcome, BackendError), outcome
        if fault.startswith("stall"):
            assert isinstance(outcome, BackendTimeoutError) and "stall_timeout" in str(outcome)
    elif stage == "skeleton" and fault in REFUSALS:
        assert isinstance(outcome, BackendError) and getattr(outcome, "status_code", None) == int(fault)
        assert not [r for r in stats["requests"] if r["kind"] == "full"]  # no fallback request was sent
    elif stage == "skeleton":
        assert isinstance(outcome, Result) and outcome.mode_used == "normal" and outcome.complete
        assert "skeleton" in (outcome.fallback_reason or "")
    else:
        assert isinstance(outcome, Result) and outcome.complete
        assert outcome.mode_used == "normal" and (outcome.fallback_reason or "").startswith("point ")
