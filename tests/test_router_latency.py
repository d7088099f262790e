"""The trained router's cost on the embedded model: decision latency (p50/p99, embedding included) and the
time `auto` mode adds to the first token of a normal answer, measured side by side (slow: loads the model).

Run as a script for the README's figures: `python tests/test_router_latency.py` (prints JSON).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import pytest

from sot.backends.base import Message
from sot.router.base import router_input
from sot.router.data import load_examples, own_data_dir
from sot.router.trained import TrainedRouter

# The budget: auto mode may add this share to a normal answer's time to first token.
MAX_TTFT_OVERHEAD = 0.05


def normal_questions(limit: int) -> list[str]:
    """One-turn questions of the packaged data labelled normal, a few of each kind, in a fixed order."""
    per_kind: dict[str, list[str]] = {}
    for example in load_examples(own_data_dir()):
        if not example.label and not example.multi_turn:
            per_kind.setdefault(example.kind, []).append(example.question)
    out: list[str] = []
    while len(out) < limit and any(per_kind.values()):
        for kind in sorted(per_kind):
            if per_kind[kind] and len(out) < limit:
                out.append(per_kind[kind].pop(0))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def decision_latency(router: TrainedRouter, conversations: list[list[Message]], rounds: int = 3) -> dict[str, float]:
    """Wall-clock ms of `decide_view` per conversation (bounding, tokenizing, embedding, scoring), warm."""
    router.prepare()
    views = [router_input(c) for c in conversations]
    router.decide_view(views[0])
    times = []
    for _ in range(rounds):
        for view in views:
            start = time.perf_counter()
            router.decide_view(view)
            times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": round(percentile(times, 0.5), 3), "p99_ms": round(percentile(times, 0.99), 3), "n": len(times)}


@dataclass
class Timing:
    ttft: float
    route: float | None
    mode: str | None


async def _timed_run(engine: Any, question: str, mode: str) -> Timing:
    from sot.events import AnswerDelta, RouteDecided

    start = time.perf_counter()
    route_at = first = None
    used = None
    async with engine_stream(engine, question, mode) as events:
        async for event in events:  # to the end: the next run starts on an idle engine
            if isinstance(event, RouteDecided):
                route_at, used = time.perf_counter() - start, event.mode
            if isinstance(event, AnswerDelta) and event.text and first is None:
                first = time.perf_counter() - start
    if first is None:
        raise AssertionError("no answer text")
    return Timing(first, route_at, used)


def engine_stream(engine: Any, question: str, mode: str) -> Any:
    import contextlib

    return contextlib.aclosing(engine.stream(question, mode))


class TimedRouter:
    """The trained router, timing each decision as the engine awaits it."""

    name = "trained"

    def __init__(self, router: TrainedRouter) -> None:
        self.router = router
        self.seconds: list[float] = []
        self.by_question: dict[str, list[float]] = {}

    async def decide(self, messages: Any) -> Any:
        start = time.perf_counter()
        decision = await self.router.decide(messages)
        seconds = time.perf_counter() - start
        self.seconds.append(seconds)
        self.by_question.setdefault(messages[-1].content, []).append(seconds)
        return decision


async def ttft_side_by_side(questions: list[str], rounds: int = 2) -> dict[str, Any]:
    """Normal and auto mode on one engine, alternating run by run. Question i in normal mode is paired with
    question i + n/2 in auto mode (and the other way round in odd rounds), so the engine's prefix cache
    (the last 4 prompts) never holds the question a run is about to ask; the shared template prefix is
    cached for both modes alike."""
    from sot import Engine, create_backend
    from sot.engine.config import EngineConfig, recommended_sampling

    backend = create_backend("local")
    router = TimedRouter(TrainedRouter())
    await asyncio.to_thread(router.router.prepare)
    config = EngineConfig(sampling=replace(recommended_sampling(backend), max_tokens=8))
    engine = Engine(backend, config, router=router)
    n = len(questions)
    normal: dict[int, list[float]] = {}
    auto: dict[int, list[float]] = {}
    routed_to_sot = 0
    try:
        await engine.run("Hello!", mode="normal")
        for r in range(rounds):
            for i in range(n):
                pair = [("normal", i), ("auto", (i + n // 2) % n)]
                for mode, q in pair if r % 2 == 0 else reversed(pair):
                    timing = await _timed_run(engine, questions[q], mode)
                    if mode == "normal":
                        normal.setdefault(q, []).append(timing.ttft)
                    elif timing.mode == "normal":
                        auto.setdefault(q, []).append(timing.ttft)
                    else:
                        routed_to_sot += 1
    finally:
        await backend.aclose()
    normal_all = [t for ts in normal.values() for t in ts]
    auto_all = [t for ts in auto.values() for t in ts]
    base = statistics.median(normal_all)
    # Best of the rounds per question: the intrinsic cost, with less of the other jobs' noise in it.
    best_normal = statistics.median(min(ts) for ts in normal.values())
    best_route = statistics.median(min(ts) for ts in router.by_question.values())
    return {
        "questions": n,
        "runs_per_mode": len(normal_all),
        "normal_ttft_median_ms": round(1000 * base, 2),
        "auto_ttft_median_ms": round(1000 * statistics.median(auto_all), 2),
        "overhead_of_medians": round(statistics.median(auto_all) / base - 1, 4),
        "route_p50_ms": round(1000 * statistics.median(router.seconds), 3),
        "route_p99_ms": round(1000 * percentile(router.seconds, 0.99), 3),
        "overhead_route_share": round(statistics.median(router.seconds) / base, 4),
        "best_of_rounds": {
            "normal_ttft_ms": round(1000 * best_normal, 2),
            "route_ms": round(1000 * best_route, 3),
            "overhead": round(best_route / best_normal, 4),
        },
        "auto_runs_routed_to_sot": routed_to_sot,
        "router": router.router.fallback_reason or "combined (words + embedding)",
    }


@pytest.mark.slow
def test_decision_latency_is_milliseconds() -> None:
    router = TrainedRouter()
    conversations = [[Message(role="user", content=q)] for q in normal_questions(60)]
    latency = decision_latency(router, conversations)
    assert router.fallback_reason is None, router.fallback_reason
    assert latency["p50_ms"] < 10, latency  # about 2 ms; generous for a shared, busy machine
    assert latency["p99_ms"] < 50, latency


@pytest.mark.slow
def test_auto_mode_adds_under_5_percent_to_time_to_first_token() -> None:
    # Auto mode is normal mode with the routing decision first. The end-to-end medians are reported, but
    # their difference (~2 ms) is inside the noise of other jobs on 2 shared cores; what is asserted is the
    # routing time inside the auto runs as a share of the normal TTFT, each the best of its rounds.
    result = asyncio.run(ttft_side_by_side(normal_questions(24), rounds=2))
    print(json.dumps(result))
    assert result["router"].startswith("combined"), result
    assert result["best_of_rounds"]["overhead"] < MAX_TTFT_OVERHEAD, result


if __name__ == "__main__":
    questions = normal_questions(40)
    report = {
        "decision_latency": decision_latency(TrainedRouter(), [[Message(role="user", content=q)] for q in questions]),
        "ttft": asyncio.run(ttft_side_by_side(questions, rounds=3)),
    }
    print(json.dumps(report, indent=2))
