"""The engine against the in-process scripted backend: orchestration, failures, cancellation, stats."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator

import pytest

from sot.backends.base import Chunk, GenerationRequest, Message, SamplingParams
from sot.backends.scripted import ScriptedBackend, default_responder
from sot.engine import Engine, EngineConfig
from sot.errors import BackendStatusError, BadRequestError, InputError, RateLimitError
from sot.events import AnswerDelta, Done, ErrorEvent, Fallback, PointDelta, PointDone, PointStarted, SkeletonDone


def point_index(request: GenerationRequest) -> int | None:
    """Which point a request expands (its prefill is "N. <point>:"), or None."""
    head, _, rest = request.prefill.partition(".")
    # The skeleton's prefill is a bare "1."; a fallback continues the answer sent so far ("1. First idea").
    return int(head) if head.isdigit() and rest.strip() and rest.endswith(":") else None


async def collect(engine: Engine, question: str | list[Message] = "How can I sleep better?", mode: str = "sot"):
    return [event async for event in engine.stream(question, mode)]  # type: ignore[arg-type]


async def test_sot_latency_is_skeleton_plus_slowest_point_not_the_sum() -> None:
    backend = ScriptedBackend(token_delay=0.02)
    engine = Engine(backend)
    started = time.perf_counter()
    events = await collect(engine)
    elapsed = time.perf_counter() - started
    result = events[-1].result
    assert result.mode_used == "sot" and result.complete
    assert result.points == ["First idea", "Second idea", "Third idea"]
    assert result.answer.splitlines()[1] == "2. Second idea: A short explanation of this point."
    stats = result.stats
    point_sum = sum(p.seconds for p in stats.points)
    assert elapsed < stats.skeleton_seconds + point_sum * 0.7
    assert elapsed == pytest.approx(stats.skeleton_seconds + stats.slowest_point_seconds, abs=0.06)
    # Every point request shares the same leading messages (prefix caches serve them all).
    point_requests = [r for r in backend.requests if point_index(r)]
    assert len({r.messages[:-1] for r in point_requests}) == 1
    assert len({r.cache_key for r in point_requests}) == 1


async def test_event_order_and_stats() -> None:
    events = await collect(Engine(ScriptedBackend()))
    kinds = [e.type for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "done"
    assert kinds.index("skeleton_done") < kinds.index("point_started")
    done = Counter(e.index for e in events if isinstance(e, PointDone))
    assert done == {1: 1, 2: 1, 3: 1}
    stats = events[-1].result.stats
    assert stats.requests == 4
    assert stats.completion_tokens > 0 and stats.prompt_tokens > 0
    assert stats.time_to_first_token is not None and stats.time_to_first_token <= stats.total_seconds


async def test_normal_mode_streams_answer_and_token_times() -> None:
    events = await collect(Engine(ScriptedBackend()), mode="normal")
    result = events[-1].result
    assert result.mode_used == "normal" and result.answer == "A plain answer in a few words."
    assert len(result.stats.token_times) == 7  # one per streamed word


async def test_too_few_points_falls_back_and_says_so() -> None:
    def responder(request: GenerationRequest) -> str:
        if "skeleton" in request.messages[-1].content.lower():
            return " Just one thing.\n"
        return "Plain answer."

    events = await collect(Engine(ScriptedBackend(responder)))
    fallback = [e for e in events if isinstance(e, Fallback)]
    assert len(fallback) == 1 and "1 usable point" in fallback[0].reason
    result = events[-1].result
    assert result.mode_used == "normal" and result.fallback_reason == fallback[0].reason
    assert result.answer == "Plain answer."


async def test_failed_skeleton_falls_back_to_normal() -> None:
    def responder(request: GenerationRequest) -> str:
        if "skeleton" in request.messages[-1].content.lower():
            raise BackendStatusError("upstream answered 500: boom", status_code=500)
        return "Plain answer."

    result = (await collect(Engine(ScriptedBackend(responder))))[-1].result
    assert result.mode_used == "normal"
    assert "skeleton request failed" in result.fallback_reason and "boom" in result.fallback_reason


async def test_a_failed_point_is_retried_once() -> None:
    calls: Counter[int] = Counter()

    def responder(request: GenerationRequest) -> str:
        index = point_index(request)
        if index == 2:
            calls[2] += 1
            if calls[2] == 1:
                raise BackendStatusError("upstream answered 500: flaky", status_code=500)
        return default_responder(request)

    events = await collect(Engine(ScriptedBackend(responder)))
    result = events[-1].result
    assert result.mode_used == "sot" and result.complete
    assert calls[2] == 2
    assert [e.attempt for e in events if isinstance(e, PointStarted) and e.index == 2] == [1, 2]
    assert result.stats.points[1].attempts == 2


async def test_a_point_that_keeps_failing_falls_back() -> None:
    def responder(request: GenerationRequest) -> str:
        if point_index(request) == 3:
            raise BackendStatusError("upstream answered 500: down", status_code=500)
        return default_responder(request)

    result = (await collect(Engine(ScriptedBackend(responder))))[-1].result
    assert result.mode_used == "normal"
    assert result.fallback_reason.startswith("point 3 failed after 3 attempt(s)")  # the retry policy's default


async def test_bad_request_is_not_retried_and_raises_clearly() -> None:
    def responder(request: GenerationRequest) -> str:
        raise BadRequestError("upstream answered 400: model not found", status_code=400)

    backend = ScriptedBackend(responder)
    with pytest.raises(BadRequestError, match="model not found"):
        await collect(Engine(backend))
    assert len(backend.requests) == 1


async def test_error_event_precedes_the_raise() -> None:
    def responder(request: GenerationRequest) -> str:
        raise BackendStatusError("upstream answered 503: overloaded", status_code=503)

    seen = []
    with pytest.raises(BackendStatusError):
        async for event in Engine(ScriptedBackend(responder)).stream("q?", "normal"):
            seen.append(event)
    assert isinstance(seen[-1], ErrorEvent) and "overloaded" in seen[-1].error


async def test_stalled_point_hits_its_deadline_then_falls_back_in_time() -> None:
    def responder(request: GenerationRequest) -> str:
        if point_index(request) == 1:
            return " slow" * 1000
        return default_responder(request)

    engine = Engine(ScriptedBackend(responder, token_delay=0.01), EngineConfig(point_deadline=0.3))
    started = time.perf_counter()
    result = (await collect(engine))[-1].result
    assert time.perf_counter() - started < 3.0
    assert result.mode_used == "normal" and "timed out" not in (result.answer or "")
    assert "deadline" in result.fallback_reason


async def test_truncated_point_is_marked_never_complete() -> None:
    def responder(request: GenerationRequest) -> str:
        if point_index(request) == 2:
            return " word" * 50
        return default_responder(request)

    engine = Engine(ScriptedBackend(responder), EngineConfig(point_max_tokens=10))
    events = await collect(engine)
    result = events[-1].result
    assert result.mode_used == "sot"
    assert not result.complete and result.finish_reason == "length" and result.truncated_points == [2]
    done = next(e for e in events if isinstance(e, PointDone) and e.index == 2)
    assert done.truncated and done.finish_reason == "length"


async def test_point_stops_where_the_next_point_starts() -> None:
    def responder(request: GenerationRequest) -> str:
        if point_index(request) == 1:
            return " Keep a routine.\n2. Second idea: this belongs to point two."
        return default_responder(request)

    backend = ScriptedBackend(responder)
    events = await collect(Engine(backend))
    result = events[-1].result
    assert result.expansions[0] == "Keep a routine."
    streamed = "".join(e.text for e in events if isinstance(e, PointDelta) and e.index == 1)
    assert "point two" not in streamed
    assert backend.active == 0


async def test_consumer_that_stops_listening_cancels_every_request() -> None:
    backend = ScriptedBackend(token_delay=0.05)
    engine = Engine(backend)
    events = engine.stream("How can I sleep better?", "sot")
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, PointDelta):
                break
    assert backend.active == 0
    assert backend.cancelled >= 3  # every point still running was cancelled


async def test_cancelling_the_task_cancels_every_request() -> None:
    backend = ScriptedBackend(token_delay=0.05)
    engine = Engine(backend)
    points_running = asyncio.Event()

    async def run() -> None:
        async for event in engine.stream("How can I sleep better?"):
            if isinstance(event, PointDelta):
                points_running.set()

    task = asyncio.create_task(run())
    await points_running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.active == 0


async def test_instruction_style_for_backends_without_prefill() -> None:
    backend = ScriptedBackend(supports_prefill=False)
    result = (await collect(Engine(backend)))[-1].result
    assert result.mode_used == "sot"
    assert all(r.prefill == "" for r in backend.requests)
    assert 'Start your reply with "2. Second idea:' in backend.requests[2].messages[-1].content


async def test_parallelism_is_bounded() -> None:
    peak = 0
    backend = ScriptedBackend(token_delay=0.01)
    original = backend.stream

    async def watching(request: GenerationRequest):  # type: ignore[no-untyped-def]
        nonlocal peak
        async for chunk in original(request):
            peak = max(peak, backend.active)
            yield chunk

    backend.stream = watching  # type: ignore[method-assign]
    await collect(Engine(backend, EngineConfig(max_parallel=2)))
    assert peak == 2


async def test_multi_turn_conversation_reaches_every_request() -> None:
    backend = ScriptedBackend()
    conversation = [
        Message("user", "I work night shifts."),
        Message("assistant", "Noted."),
        Message("user", "Sleep tips?"),
    ]
    await collect(Engine(backend), conversation)
    assert all(Message("user", "I work night shifts.") in r.messages for r in backend.requests)


async def test_auto_uses_the_trained_router_by_default() -> None:
    engine = Engine(ScriptedBackend())
    listy = await collect(engine, "What are the most effective ways to deal with stress?", mode="auto")
    assert listy[1].type == "route_decided" and listy[1].router == "trained"
    assert listy[-1].result.mode_used == "sot" and listy[-1].result.route.mode == "sot"
    mathy = await collect(engine, "Solve for x in the equation 3x + 10 = 5(x - 2).", mode="auto")
    assert mathy[1].mode == "normal" and mathy[-1].result.mode_used == "normal"
    assert mathy[-1].result.fallback_reason is None  # routing is a decision, not a fallback


@pytest.mark.parametrize(
    ("question", "message"),
    [("", "empty"), ("   \n", "empty"), ("x" * 200_001, "limit"), ([Message("assistant", "hi")], "end with a user")],
)
async def test_bad_input_raises_input_error(question: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        await collect(Engine(ScriptedBackend()), question)  # type: ignore[arg-type]


async def test_braces_and_numbered_lines_in_the_question_are_safe() -> None:
    question = "Explain {this} and {{that}}:\n1. first\n2. {point} {index}"
    backend = ScriptedBackend()
    result = (await collect(Engine(backend), question))[-1].result
    assert result.mode_used == "sot"
    assert question in backend.requests[0].messages[-1].content


def test_run_sync_and_sampling_are_passed_through() -> None:
    backend = ScriptedBackend()
    engine = Engine(backend, EngineConfig(sampling=SamplingParams(temperature=0.3, seed=7), point_max_tokens=50))
    result = engine.run_sync("Sleep tips?")
    assert isinstance(result.stats.total_seconds, float)
    assert all(r.sampling.temperature == 0.3 and r.sampling.seed == 7 for r in backend.requests)
    assert backend.requests[1].sampling.max_tokens == 50


def test_done_is_the_last_event() -> None:
    async def main() -> list[object]:
        return await collect(Engine(ScriptedBackend()))

    events = asyncio.run(main())
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    assert any(isinstance(e, SkeletonDone) for e in events)


async def test_overlap_starts_points_while_the_skeleton_streams() -> None:
    backend = ScriptedBackend(token_delay=0.02)
    engine = Engine(backend, EngineConfig(overlap=True))
    events = await collect(engine)
    result = events[-1].result
    assert result.mode_used == "sot" and result.complete and len(result.points) == 3
    # Point 1 was requested before the skeleton finished, so its prompt shows only the skeleton so far.
    first = next(r for r in backend.requests if point_index(r) == 1)
    assert any(m.content == "1. First idea" for m in first.messages)
    assert result.stats.points[0].start < result.stats.skeleton_seconds
    # Views still see the skeleton announced before any point event.
    kinds = [e.type for e in events]
    assert kinds.index("skeleton_done") < kinds.index("point_started")
    assert result.answer.splitlines()[0] == "1. First idea: A short explanation of this point."


async def test_overlap_cancels_early_points_when_the_skeleton_is_too_short() -> None:
    def responder(request: GenerationRequest) -> str:
        if "skeleton" in request.messages[-1].content.lower() and not point_index(request):
            return " Only idea\nThat is all, really, nothing else to add here."
        if point_index(request):
            return " slow" * 200
        return "Plain answer."

    backend = ScriptedBackend(responder, token_delay=0.01)
    result = (await collect(Engine(backend, EngineConfig(overlap=True))))[-1].result
    assert result.mode_used == "normal" and "1 usable point" in (result.fallback_reason or "")
    assert backend.active == 0


def _prose_skeleton(request: GenerationRequest) -> str:
    """A model that writes sentences as skeleton points, continuing from whatever number the prefill ends on."""
    if "skeleton" not in request.messages[-1].content.lower():
        return " Explained." if point_index(request) else "Plain answer."
    number = int(request.prefill.rsplit("\n", 1)[-1].rstrip("."))
    lines = [f" Sentence {n} runs on and on about many things at once" for n in range(number, 7)]
    return "\n".join(f"{n}.{line}" if n > number else line for n, line in zip(range(number, 7), lines, strict=True))


async def test_prose_skeleton_points_are_cut_and_the_skeleton_ends_at_three() -> None:
    backend = ScriptedBackend(_prose_skeleton)
    events = await collect(Engine(backend, EngineConfig(skeleton_point_max_words=4)))
    result = events[-1].result
    assert result.mode_used == "sot"
    assert result.points == ["Sentence 1 runs on", "Sentence 2 runs on", "Sentence 3 runs on"]
    # Each continuation was prefilled with the skeleton so far, its last line cut, and the next number.
    skeleton_prefills = [r.prefill for r in backend.requests if not r.stop]  # point requests stop at "\n\n"
    # (The scripted backend streams a word with its trailing space; text already streamed is never taken back.)
    assert skeleton_prefills == [
        "1.",
        "1. Sentence 1 runs on \n2.",
        "1. Sentence 1 runs on \n2. Sentence 2 runs on \n3.",
    ]
    # What views were streamed is exactly the skeleton the engine used.
    streamed = "".join(e.text for e in events if e.type == "skeleton_delta")
    done = next(e for e in events if isinstance(e, SkeletonDone))
    assert streamed == done.text == "1. Sentence 1 runs on \n2. Sentence 2 runs on \n3. Sentence 3 runs on "
    assert backend.active == 0 and backend.cancelled == 3  # each cut stopped its request


async def test_prose_skeleton_is_not_cut_without_prefill_or_when_disabled() -> None:
    for backend, config in (
        (ScriptedBackend(_prose_skeleton), EngineConfig(skeleton_point_max_words=None)),
        (
            ScriptedBackend(lambda r: _prose_skeleton(r) if r.prefill else "1. A b c d e f g h\n2. B c d e f g h i"),
            EngineConfig(skeleton_point_max_words=4, use_prefill=False),
        ),
    ):
        result = (await collect(Engine(backend, config)))[-1].result
        assert len([r for r in backend.requests if not r.stop]) == 1  # one skeleton request
        assert all(len(p.split()) > 4 for p in result.points)


# -- the streaming engine against the non-streaming reference ----------------------------------------------


def _varied_responder(request: GenerationRequest) -> str:
    """Skeletons and points of different shapes: echoes, markup, wrapped lines, a next point, a blank line."""
    last = request.messages[-1].content
    if "skeleton" in last.lower():
        body = "1. Keep a **routine**\n2. Limit caffeine\n   after noon\n3. Dark, cool room\n- not a point\n\n"
        return body[len(request.prefill) :] if body.startswith(request.prefill) else body
    index = point_index(request)
    shapes = {
        1: " Go to bed at the same time.\n2. Limit caffeine: this is the next point",
        2: " Coffee late in the day   keeps you up.\n\nUnrelated chatter.",
        3: " 3. Dark, cool room: Darkness helps\nmelatonin. A cool room helps too. More text.",
    }
    return shapes.get(index or 0, "A plain answer.")


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("responder", [default_responder, _varied_responder])
async def test_the_streaming_engine_answers_as_the_reference_does(prefill: bool, responder) -> None:  # type: ignore[no-untyped-def]
    from sot.engine.reference import answer_with_sot

    backend = ScriptedBackend(responder, supports_prefill=prefill)
    engine = Engine(backend)
    events = await collect(engine)
    result = events[-1].result
    reference = await answer_with_sot(
        backend, [Message("user", "How can I sleep better?")], engine.prompts, engine.config, prefill=prefill
    )
    assert reference is not None and result.mode_used == "sot"
    points, expansions, answer = reference
    assert len(points) == 3
    assert result.points == points and result.expansions == expansions and result.answer == answer
    # Every view sees the same text: the answer deltas add up to the answer, each point's deltas to its text.
    assert "".join(e.text for e in events if e.type == "answer_delta") == result.answer
    for i, expansion in enumerate(expansions, start=1):
        assert "".join(e.text for e in events if isinstance(e, PointDelta) and e.index == i) == expansion


@pytest.mark.parametrize("budget", [1, 5, 12, 40])
@pytest.mark.parametrize("mode", ["sot", "normal"])
async def test_answer_max_tokens_bounds_the_whole_answer(budget: int, mode: str) -> None:
    def responder(request: GenerationRequest) -> str:
        if point_index(request):
            return " A rather long explanation of this point that goes on for a while."
        return default_responder(request) if "skeleton" in request.messages[-1].content.lower() else " word" * 30

    events = await collect(Engine(ScriptedBackend(responder), EngineConfig(answer_max_tokens=budget)), mode=mode)
    result = events[-1].result
    assert 0 < result.stats.completion_tokens <= budget or (budget == 1 and result.stats.completion_tokens <= 1)
    assert "".join(e.text for e in events if e.type == "answer_delta") == result.answer
    if result.stats.completion_tokens >= budget:
        assert not result.complete and result.finish_reason == "length"


async def test_answer_stop_goes_with_a_normal_answer_and_its_fallback_but_not_the_skeleton_or_points() -> None:
    stops = ("END", "\n\nQ:")
    backend = ScriptedBackend()
    await collect(Engine(backend, EngineConfig(answer_stop=stops)), mode="normal")
    assert [r.stop for r in backend.requests] == [stops]
    await collect(Engine(backend, EngineConfig(answer_stop=stops)), mode="sot")
    sot_requests = backend.requests[1:]
    assert len(sot_requests) == 4 and all(r.stop != stops for r in sot_requests)  # a skeleton and three points

    def one_point(request: GenerationRequest) -> str:  # too few points: SoT falls back to a normal answer
        return "1. Only one idea\n\n" if "skeleton" in request.messages[-1].content.lower() else "A normal answer."

    fallback = ScriptedBackend(one_point)
    result = (await collect(Engine(fallback, EngineConfig(answer_stop=stops)), mode="sot"))[-1].result
    assert result.fallback_reason is not None and fallback.requests[-1].stop == stops


async def test_overlap_expands_a_wrapped_point_with_its_complete_text() -> None:
    def responder(request: GenerationRequest) -> str:
        if "skeleton" in request.messages[-1].content.lower() and not point_index(request):
            return " Set clear goals\n   and priorities\n2. Plan the day\n3. Take breaks\n\n"
        return default_responder(request)

    backend = ScriptedBackend(responder, token_delay=0.01)
    result = (await collect(Engine(backend, EngineConfig(overlap=True))))[-1].result
    assert result.points[0] == "Set clear goals and priorities"
    first = next(r for r in backend.requests if point_index(r) == 1)
    assert first.prefill == "1. Set clear goals and priorities:"  # not the text of the first line alone
    assert result.stats.points[0].start < result.stats.skeleton_seconds  # and it still started early


async def test_a_point_whose_text_is_sent_while_it_waits_to_retry_is_not_retried() -> None:
    """Point 2 streams its text, then fails with a 429 asking for 0.3 s; point 1 finishes during that wait, which
    sends point 2's text on. A retry would start point 2 again under text the reader already has, so it is not
    retried: SoT falls back, continuing the text that was sent, and the answer is whole."""
    attempts: Counter[int] = Counter()

    class RacingBackend(ScriptedBackend):
        async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
            index = point_index(request)
            if index == 2:
                attempts[2] += 1
                yield Chunk()
                yield Chunk(text=" Half of the second")
                raise RateLimitError("upstream answered 429: slow down", retry_after=0.3, backend=self.name)
            if index == 1:
                await asyncio.sleep(0.1)
            async for chunk in super().stream(request):
                yield chunk

    events = await collect(Engine(RacingBackend()))
    result = events[-1].result
    assert attempts[2] == 1
    assert result.mode_used == "normal" and result.complete
    assert result.fallback_reason.startswith("point 2 failed after 1 attempt(s): RateLimitError")
    sent = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert sent == result.answer and "Half of the second" in result.answer  # one answer, continued
