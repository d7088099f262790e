"""The one retry policy, measured from the upstream's side: requests counted in its /stats, with their times."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from sot.backends.base import GenerationRequest
from sot.backends.openai_compat import OpenAIBackend
from sot.engine import Engine, EngineConfig, RetryPolicy
from sot.engine.retry import RetryBudget, is_transient
from sot.errors import (
    AuthenticationError,
    BackendConnectionError,
    BackendStatusError,
    BackendStreamError,
    BadRequestError,
    RateLimitError,
)
from upstream_helpers import async_wait_for_stats

QUESTION = "What are the most effective ways to deal with stress?"


def engine_for(base_url: str, **config: Any) -> Engine:
    backend = OpenAIBackend("sot-test", base_url=base_url, api_key="test")
    return Engine(backend, EngineConfig(**config))


async def settled(base_url: str) -> dict[str, Any]:
    return await async_wait_for_stats(base_url, lambda s: s["active"] == 0, seconds=5.0)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (BackendConnectionError("refused"), True),
        (BackendStreamError("cut"), True),
        (BackendStatusError("x", status_code=500), True),
        (BackendStatusError("x", status_code=503), True),
        (BackendStatusError("x", status_code=408), True),
        (BackendStatusError("x", status_code=409), True),
        (RateLimitError("x"), True),
        (BadRequestError("x", status_code=400), False),
        (BadRequestError("x", status_code=404), False),
        (BadRequestError("x", status_code=422), False),
        (AuthenticationError("x", status_code=401), False),
        (AuthenticationError("x", status_code=403), False),
    ],
)
def test_which_errors_are_retried(error: Exception, retried: bool) -> None:
    assert is_transient(error) is retried  # type: ignore[arg-type]
    delay = RetryPolicy(jitter=False).delay(error, 1, time_left=60.0, budget=RetryBudget(5))  # type: ignore[arg-type]
    assert (delay is not None) is retried


def test_retry_after_is_honoured_and_bounded_by_the_deadline_and_budget() -> None:
    policy = RetryPolicy(base_delay=0.1, jitter=False)
    assert policy.delay(RateLimitError("x", retry_after=2.0), 1, time_left=60.0, budget=RetryBudget(5)) == 2.0
    assert policy.delay(RateLimitError("x", retry_after=2.0), 1, time_left=1.5, budget=RetryBudget(5)) is None
    assert policy.delay(RateLimitError("x"), 1, time_left=60.0, budget=RetryBudget(0)) is None
    assert policy.delay(RateLimitError("x"), policy.max_attempts, time_left=60.0, budget=RetryBudget(5)) is None
    budget = RetryBudget(1)
    assert policy.delay(RateLimitError("x"), 1, time_left=60.0, budget=budget) == 0.1
    assert budget.left == 0 and budget.spent == 1


async def test_failing_points_cost_at_most_the_budget(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(
        ttft=0.01, tokens_per_second=1000, skeleton_points=4, fault="500", fault_kind="point", fault_rate=1.0
    )
    engine = engine_for(base_url, retry=RetryPolicy(max_attempts=3, budget=3, base_delay=0.01, max_delay=0.02))
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    stats = await settled(base_url)
    kinds = [r["kind"] for r in stats["requests"]]
    assert result.mode_used == "normal" and result.fallback_reason is not None
    assert kinds.count("skeleton") == 1
    assert kinds.count("point") <= 4 + 3  # four first attempts and at most the question's budget of three
    assert result.stats.retries <= 3
    assert len(kinds) <= result.stats.requests  # a retry cancelled while it waited never reached the upstream


async def test_a_429_is_retried_no_sooner_than_its_retry_after(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=1000, fault="429", fault_first=1, retry_after=1)
    engine = engine_for(base_url, retry=RetryPolicy(base_delay=0.01))
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    stats = await settled(base_url)
    skeletons = [r for r in stats["requests"] if r["kind"] == "skeleton"]
    assert result.mode_used == "sot" and result.complete and result.stats.retries == 1
    assert [r["http_status"] for r in skeletons] == [429, 200]
    gap = skeletons[1]["started_monotonic"] - skeletons[0]["ended_monotonic"]
    assert 1.0 <= gap < 1.5


class PointFaults(OpenAIBackend):
    """Per-request test options: point 1 breaks mid-stream after 0.3 s (its text already in the answer, so it is
    not retried); the other points are slow (2 s to first token), so they are still running then."""

    def _payload(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, str]]:
        body, headers = super()._payload(request)
        match = re.search(r"expand point (\d+)", request.messages[-1].content)
        if match:
            first = {"fault": "error-mid-stream", "fault_after": 3, "ttft": 0.3}
            body["sot_test"] = first if match.group(1) == "1" else {"ttft": 2.0}
        return body, headers


async def test_a_point_that_fails_for_good_starts_the_fallback_at_once(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=1000, skeleton_points=4)
    engine = Engine(PointFaults("sot-test", base_url=base_url, api_key="test"))
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    stats = await settled(base_url)
    requests = stats["requests"]
    broken = [r for r in requests if r["fault"] == "error-mid-stream"]
    fallback = next(r for r in requests if r["kind"] == "full")
    assert len(broken) == 1
    assert result.mode_used == "normal" and (result.fallback_reason or "").startswith("point 1 failed")
    assert fallback["started_monotonic"] - broken[0]["ended_monotonic"] < 0.1
    slow = [r for r in requests if r["kind"] == "point" and r["fault"] is None]
    assert len(slow) == 3 and all(r["status"] == "cancelled" for r in slow)
