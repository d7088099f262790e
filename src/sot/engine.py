"""The async engine: runs one question in normal, SoT or auto mode and streams typed events.

It only orchestrates. Prompts, skeleton parsing and assembly come from `sot.core` (pure); model calls go
through the `Backend` protocol; routing through a `Router`. What it adds is the control around them:
concurrent point expansion under a bound, a deadline per point, one retry of a failed point, fallback to
normal decoding (announced, never silent), cancellation of every in-flight request when the caller stops
listening, and the statistics of the run. A sync wrapper, `run_sync`, exists for the edges only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sot.backends.base import Backend, Chunk, GenerationRequest, Message, SamplingParams
from sot.core.assemble import assemble_answer, clean_point_text
from sot.core.prompts import CHAT, SMOLLM, PromptSet, point_request, render_skeleton, skeleton_request
from sot.core.skeleton import overlong_point, parse_skeleton
from sot.core.stops import find_point_end, undecided_tail
from sot.errors import (
    AuthenticationError,
    BackendError,
    BackendTimeoutError,
    BadRequestError,
    InputError,
)
from sot.events import (
    AnswerDelta,
    Done,
    ErrorEvent,
    Event,
    Fallback,
    Mode,
    PointDelta,
    PointDone,
    PointStarted,
    PointStats,
    Result,
    RouteDecided,
    RunStarted,
    SkeletonDelta,
    SkeletonDone,
    Stats,
)


class RouterLike(Protocol):
    """What the engine needs of a router (see `sot.router`)."""

    name: str

    async def decide(self, messages: Sequence[Message]) -> Any: ...


# Where a skeleton's points run into prose, it is cut at this many points (the prompts ask for 3 to 8).
_POINTS_BEFORE_PROSE_ENDS = 3


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of a run. Defaults suit both API models and the embedded model."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompts: PromptSet | None = None  # None: chosen by backend (prefill-capable local models get "smollm")
    use_prefill: bool | None = None  # None: whatever the backend supports
    max_points: int = 10
    min_points: int = 2
    max_point_chars: int = 120
    skeleton_max_tokens: int = 160
    # Cut a skeleton point after this many words (prefill-capable backends only): SmolLM2 sometimes writes
    # sentence-long points, doubling SoT's sequential skeleton time. See `_skeleton`. None: no cut.
    skeleton_point_max_words: int | None = 8
    point_max_tokens: int = 160
    max_parallel: int = 16
    skeleton_deadline: float = 120.0
    point_deadline: float = 120.0
    point_retries: int = 1
    max_question_chars: int = 100_000
    # Start expanding a point as soon as its skeleton line is complete, while the skeleton goes on.
    overlap: bool = False
    # End a point after this many sentences; None: as the prompt set says (`PromptSet.point_max_sentences`).
    point_max_sentences: int | None = None


def recommended_sampling(backend: Backend) -> SamplingParams:
    """The backend's recommended generation settings, or the generic defaults."""
    sampling = getattr(backend, "default_sampling", None)
    return sampling if isinstance(sampling, SamplingParams) else SamplingParams()


def normalize_conversation(conversation: str | Sequence[Message] | Sequence[dict[str, Any]]) -> list[Message]:
    """Accept a question, `Message`s or OpenAI-style dicts; return a validated conversation."""
    if isinstance(conversation, str):
        messages = [Message("user", conversation)]
    else:
        messages = []
        for item in conversation:
            if isinstance(item, Message):
                messages.append(item)
                continue
            role, content = item.get("role"), item.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise InputError(f"each message needs a role (system/user/assistant) and text content: {item!r}")
            messages.append(Message(role, content))
    if not messages or messages[-1].role != "user":
        raise InputError("the conversation must end with a user message")
    if not messages[-1].content.strip():
        raise InputError("the question is empty")
    return messages


def _check_size(messages: Sequence[Message], limit: int) -> None:
    size = sum(len(m.content) for m in messages)
    if size > limit:
        raise InputError(f"the conversation has {size:,} characters; the limit is {limit:,}")


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.start

    def mark_token(self) -> None:
        if self.first_token is None:
            self.first_token = self.now()


@dataclass
class _Tally:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_prompt_tokens: int | None = None
    requests: int = 0

    def add(self, chunk: Chunk, counted_chunks: int) -> None:
        self.requests += 1
        if chunk.usage is None:
            self.completion_tokens += counted_chunks
            return
        self.prompt_tokens += chunk.usage.prompt_tokens
        self.completion_tokens += chunk.usage.completion_tokens or counted_chunks
        if chunk.usage.computed_prompt_tokens is not None:
            self.computed_prompt_tokens = (self.computed_prompt_tokens or 0) + chunk.usage.computed_prompt_tokens


@dataclass
class _SkeletonOutcome:
    text: str
    finish: str
    error: BaseException | None = None


@dataclass
class _PointOutcome:
    index: int
    raw: str
    finish_reason: str
    tokens: int
    start: float
    seconds: float
    attempts: int
    error: str | None = None


class Engine:
    """Answers questions on one backend, in normal, SoT or auto (routed) mode."""

    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        *,
        router: RouterLike | None = None,
    ) -> None:
        self.backend = backend
        # Without a config, generation follows the backend's own recommended settings (the embedded model
        # has a repetition penalty that stops greedy loops), the same for every mode.
        self.config = config or EngineConfig(sampling=recommended_sampling(backend))
        self.router = router

    # -- public API ---------------------------------------------------------------------------------

    @property
    def use_prefill(self) -> bool:
        if self.config.use_prefill is None:
            return self.backend.supports_prefill
        return self.config.use_prefill and self.backend.supports_prefill

    @property
    def prompts(self) -> PromptSet:
        if self.config.prompts is not None:
            return self.config.prompts
        return SMOLLM if self.backend.name == "local" else CHAT

    async def stream(
        self,
        conversation: str | Sequence[Message] | Sequence[dict[str, Any]],
        mode: Mode = "sot",
    ) -> AsyncGenerator[Event, None]:
        """Answer, yielding events; the last one is `Done` (or `ErrorEvent`, after which the error is raised).

        Stopping iteration early (break, `aclose()`, task cancellation) cancels every in-flight request.
        """
        messages = normalize_conversation(conversation)
        _check_size(messages, self.config.max_question_chars)
        clock = _Clock()
        tally = _Tally()
        counters_before = self._backend_counters()
        yield RunStarted(mode=mode, backend=self.backend.name, model=self.backend.model)
        try:
            route: RouteDecided | None = None
            used = mode
            if mode == "auto":
                route = await self._route(messages)
                yield route
                used = route.mode
            stats = Stats()
            if used == "sot":
                gen = self._sot(messages, clock, tally, stats)
            else:
                gen = self._normal(messages, clock, tally, stats, fallback_reason=None)
            result: Result | None = None
            async with contextlib.aclosing(gen) as events:
                async for event in events:
                    if isinstance(event, Done):
                        result = event.result
                    else:
                        yield event
            assert result is not None
            result.mode_requested = mode
            result.route = route
            result.stats.total_seconds = clock.now()
            result.stats.time_to_first_token = clock.first_token
            result.stats.prompt_tokens = tally.prompt_tokens
            result.stats.completion_tokens = tally.completion_tokens
            result.stats.computed_prompt_tokens = tally.computed_prompt_tokens
            result.stats.requests = tally.requests
            result.stats.backend = self._counter_delta(counters_before)
            yield Done(result=result)
        except BackendError as exc:
            yield ErrorEvent(error=str(exc), kind=type(exc).__name__)
            raise

    async def run(
        self,
        conversation: str | Sequence[Message] | Sequence[dict[str, Any]],
        mode: Mode = "sot",
    ) -> Result:
        """Answer and return only the final result."""
        result: Result | None = None
        async with contextlib.aclosing(self.stream(conversation, mode)) as events:
            async for event in events:
                if isinstance(event, Done):
                    result = event.result
        assert result is not None
        return result

    def run_sync(
        self,
        conversation: str | Sequence[Message] | Sequence[dict[str, Any]],
        mode: Mode = "sot",
    ) -> Result:
        """`run` for synchronous callers (not from inside a running event loop)."""
        return asyncio.run(self.run(conversation, mode))

    # -- routing ------------------------------------------------------------------------------------

    async def _route(self, messages: list[Message]) -> RouteDecided:
        if self.router is None:
            from sot.router import make_router  # the trained router: offline, milliseconds

            self.router = make_router("trained")
        decision = await self.router.decide(messages)
        return RouteDecided(
            mode="sot" if decision.use_sot else "normal",
            router=decision.router,
            reason=decision.reason,
            score=decision.score,
        )

    # -- normal decoding ----------------------------------------------------------------------------

    async def _normal(
        self,
        messages: list[Message],
        clock: _Clock,
        tally: _Tally,
        stats: Stats,
        *,
        fallback_reason: str | None,
        skeleton: str | None = None,
    ) -> AsyncGenerator[Event, None]:
        request = GenerationRequest(messages=tuple(messages), sampling=self.config.sampling)
        parts: list[str] = []
        chunks = 0
        last: Chunk | None = None
        async with contextlib.aclosing(self.backend.stream(request)) as stream:
            async for chunk in stream:
                last = chunk
                if chunk.text:
                    chunks += 1
                    clock.mark_token()
                    stats.token_times.append(clock.now())
                    parts.append(chunk.text)
                    yield AnswerDelta(text=chunk.text)
        assert last is not None and last.finish_reason is not None  # the backend contract guarantees it
        tally.add(last, chunks)
        finish = last.finish_reason
        yield Done(
            result=Result(
                mode_requested="normal",
                mode_used="normal",
                answer="".join(parts).strip(),
                complete=finish == "stop",
                finish_reason=finish,
                skeleton=skeleton,
                fallback_reason=fallback_reason,
                backend=self.backend.name,
                model=self.backend.model,
                stats=stats,
            )
        )

    async def _fallback(
        self,
        messages: list[Message],
        clock: _Clock,
        tally: _Tally,
        stats: Stats,
        reason: str,
        skeleton: str | None,
    ) -> AsyncGenerator[Event, None]:
        yield Fallback(reason=reason)
        async with contextlib.aclosing(
            self._normal(messages, clock, tally, stats, fallback_reason=reason, skeleton=skeleton)
        ) as events:
            async for event in events:
                yield event

    # -- skeleton-of-thought ------------------------------------------------------------------------

    async def _skeleton(
        self, messages: list[Message], clock: _Clock, tally: _Tally
    ) -> AsyncGenerator[SkeletonDelta | tuple[str, str], None]:
        """Stream the skeleton; the last item is (full text, finish reason).

        With a prefill-capable backend, a point that runs past `skeleton_point_max_words` is cut after its
        last allowed word; while the skeleton has fewer than three points it goes on from a new request
        prefilled with the text so far and the next number (a prefix cache makes that request cost a few
        tokens), otherwise it ends there.
        """
        config = self.config
        prompt, prefill = skeleton_request(self.prompts, messages, prefill=self.use_prefill)
        max_words = config.skeleton_point_max_words if self.use_prefill else None
        text = prefill
        if prefill:
            yield SkeletonDelta(text=prefill)
        generated = 0
        finish = "stop"
        async with asyncio.timeout(config.skeleton_deadline):
            for _continuation in range(config.max_points + 1):
                sampling = replace(config.sampling, max_tokens=config.skeleton_max_tokens - generated)
                request = GenerationRequest(messages=tuple(prompt), sampling=sampling, prefill=text)
                chunks = 0
                last: Chunk | None = None
                cut: tuple[int, int] | None = None
                async with contextlib.aclosing(self.backend.stream(request)) as stream:
                    async for chunk in stream:
                        last = chunk
                        if not chunk.text:
                            continue
                        chunks += 1
                        clock.mark_token()
                        candidate = text + chunk.text
                        cut = overlong_point(candidate, max_words) if max_words else None
                        if cut is not None:
                            break
                        text = candidate
                        yield SkeletonDelta(text=chunk.text)
                        if "\n" in chunk.text and parse_skeleton(text, max_points=config.max_points, final=False).ended:
                            break  # the model moved on from the skeleton: stop paying for it
                generated += chunks
                tally.add(last if last is not None and last.finish_reason is not None else Chunk(), chunks)
                if cut is None:
                    if last is not None and last.finish_reason is not None:
                        finish = last.finish_reason
                    break
                # A point that long means the model is writing prose: cut it, and end the skeleton there
                # unless it is still too short to be one, then start the next point's number for the model.
                # (Left to itself after a cut line, the model goes on with the sentence on the next line.)
                # What was already streamed (`text`: views have it) stays; the rest of the chunk goes.
                end, number = max(cut[0], len(text)), cut[1]
                more = (
                    number < min(_POINTS_BEFORE_PROSE_ENDS, config.max_points)
                    and generated < config.skeleton_max_tokens
                )
                marker = f"\n{number + 1}." if more else ""
                tail = candidate[len(text) : end] + marker
                text = candidate[:end] + marker
                if tail:
                    yield SkeletonDelta(text=tail)
                if not more:
                    break
        yield (text, finish)

    async def _skeleton_task(
        self, messages: list[Message], clock: _Clock, tally: _Tally, queue: asyncio.Queue[Any]
    ) -> None:
        """Run the skeleton stage, forwarding its deltas; the last item queued is a `_SkeletonOutcome`."""
        try:
            async with contextlib.aclosing(self._skeleton(messages, clock, tally)) as skeleton_events:
                async for step in skeleton_events:
                    if isinstance(step, tuple):
                        queue.put_nowait(_SkeletonOutcome(text=step[0], finish=step[1]))
                    else:
                        queue.put_nowait(step)
        except (BackendError, TimeoutError) as exc:
            queue.put_nowait(_SkeletonOutcome(text="", finish="error", error=exc))

    async def _sot(
        self, messages: list[Message], clock: _Clock, tally: _Tally, stats: Stats
    ) -> AsyncGenerator[Event, None]:
        config = self.config
        queue: asyncio.Queue[Any] = asyncio.Queue()
        limit = asyncio.Semaphore(max(1, config.max_parallel))
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._skeleton_task(messages, clock, tally, queue))]
        launched: list[str] = []  # the point texts each expansion was started with, in order

        def launch(visible: list[str], *, partial: bool) -> None:
            """Start expanding every point of `visible` not started yet.

            While the skeleton is still streaming (`partial`), a point sees the skeleton up to its own line;
            afterwards every point sees all of it, so all point prompts share one prefix.
            """
            for index in range(len(launched) + 1, len(visible) + 1):
                launched.append(visible[index - 1])
                shown = visible[:index] if partial else visible
                task = self._expand_point(messages, shown, index, limit, queue, clock, tally)
                tasks.append(asyncio.create_task(task))

        held: list[Event] = []  # point events that arrive before the skeleton is announced as done
        outcomes: dict[int, _PointOutcome] = {}
        fallback: tuple[str, str | None] | None = None
        points: list[str] = []
        try:
            skeleton_text = ""
            while True:
                item = await queue.get()
                if isinstance(item, _SkeletonOutcome):
                    break
                if isinstance(item, SkeletonDelta):
                    skeleton_text += item.text
                    yield item
                    if config.overlap and "\n" in item.text:
                        partial = parse_skeleton(
                            skeleton_text,
                            max_points=config.max_points,
                            max_point_chars=config.max_point_chars,
                            final=False,
                        )
                        launch(list(partial.points), partial=True)
                elif isinstance(item, _PointOutcome):
                    outcomes[item.index] = item
                else:
                    held.append(item)
            stats.skeleton_seconds = clock.now()
            if item.error is not None:
                if isinstance(item.error, AuthenticationError | BadRequestError):
                    raise item.error  # normal decoding would fail the same way
                fallback = (f"the skeleton request failed: {_describe(item.error)}", None)
            else:
                skeleton_text = item.text
                parsed = parse_skeleton(
                    skeleton_text, max_points=config.max_points, max_point_chars=config.max_point_chars
                )
                points = list(parsed.points)
                if item.finish == "length" and not parsed.ended and len(points) > len(launched):
                    points.pop()  # the last line was cut mid-way by the token limit
                # Points already started keep the text they were started with.
                points[: len(launched)] = launched
                yield SkeletonDone(text=skeleton_text, points=points, seconds=stats.skeleton_seconds)
                if len(points) < config.min_points:
                    fallback = (
                        f"the skeleton had {len(points)} usable point(s); at least {config.min_points} are needed",
                        skeleton_text,
                    )
            if fallback is None:
                for event in held:
                    yield event
                launch(points, partial=False)
                while len(outcomes) < len(points):
                    item = await queue.get()
                    if isinstance(item, _PointOutcome):
                        outcomes[item.index] = item
                    else:
                        yield item
        finally:
            # Reached on completion, on fallback and when the consumer stops listening: no request outlives us.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if fallback is None:
            ordered = [outcomes[i] for i in range(1, len(points) + 1)]
            stats.points = [
                PointStats(
                    index=o.index,
                    point=points[o.index - 1],
                    start=o.start,
                    seconds=o.seconds,
                    tokens=o.tokens,
                    finish_reason="error" if o.error else ("length" if o.finish_reason == "length" else "stop"),
                    attempts=o.attempts,
                )
                for o in ordered
            ]
            failed = next((o for o in ordered if o.error is not None), None)
            if failed is not None:
                fallback = (
                    f"point {failed.index} failed after {failed.attempts} attempt(s): {failed.error}",
                    skeleton_text,
                )
        if fallback is not None:
            reason, shown_skeleton = fallback
            async with contextlib.aclosing(
                self._fallback(messages, clock, tally, stats, reason, shown_skeleton)
            ) as events:
                async for event in events:
                    yield event
            return

        expansions = [clean_point_text(o.index, points[o.index - 1], o.raw) for o in ordered]
        truncated = [o.index for o in ordered if o.finish_reason == "length"]
        yield Done(
            result=Result(
                mode_requested="sot",
                mode_used="sot",
                answer=assemble_answer(points, expansions),
                complete=not truncated,
                finish_reason="length" if truncated else "stop",
                skeleton=render_skeleton(points),
                points=points,
                expansions=expansions,
                truncated_points=truncated,
                backend=self.backend.name,
                model=self.backend.model,
                stats=stats,
            )
        )

    async def _expand_point(
        self,
        messages: list[Message],
        points: list[str],
        index: int,
        limit: asyncio.Semaphore,
        queue: asyncio.Queue[Event | _PointOutcome],
        clock: _Clock,
        tally: _Tally,
    ) -> None:
        config = self.config
        prompt, prefill = point_request(self.prompts, messages, points, index, prefill=self.use_prefill)
        sampling = replace(config.sampling, max_tokens=config.point_max_tokens)
        request = GenerationRequest(
            messages=tuple(prompt),
            sampling=sampling,
            prefill=prefill,
            stop=("\n\n",),
            cache_key=_cache_key(messages),
        )
        async with limit:
            start = clock.now()
            attempt = 0
            while True:
                attempt += 1
                queue.put_nowait(PointStarted(index=index, point=points[index - 1], attempt=attempt))
                try:
                    raw, finish, tokens = await self._stream_point(request, index, queue, clock, tally)
                except (BackendError, TimeoutError) as exc:
                    retryable = not isinstance(exc, AuthenticationError | BadRequestError)
                    if retryable and attempt <= config.point_retries:
                        continue
                    error = _describe(exc)
                    seconds = clock.now() - start
                    queue.put_nowait(
                        PointDone(
                            index=index,
                            text="",
                            finish_reason="error",
                            truncated=False,
                            tokens=0,
                            seconds=seconds,
                            attempts=attempt,
                            error=error,
                        )
                    )
                    queue.put_nowait(_PointOutcome(index, "", "error", 0, start, seconds, attempt, error))
                    return
                seconds = clock.now() - start
                text = clean_point_text(index, points[index - 1], raw)
                queue.put_nowait(
                    PointDone(
                        index=index,
                        text=text,
                        finish_reason="length" if finish == "length" else "stop",
                        truncated=finish == "length",
                        tokens=tokens,
                        seconds=seconds,
                        attempts=attempt,
                    )
                )
                queue.put_nowait(_PointOutcome(index, raw, finish, tokens, start, seconds, attempt))
                return

    async def _stream_point(
        self,
        request: GenerationRequest,
        index: int,
        queue: asyncio.Queue[Event | _PointOutcome],
        clock: _Clock,
        tally: _Tally,
    ) -> tuple[str, str, int]:
        """One attempt at one point: returns (raw text, finish reason, tokens)."""
        text = ""
        emitted = 0
        chunks = 0
        last: Chunk | None = None
        stopped_early = False
        max_sentences = self.config.point_max_sentences or self.prompts.point_max_sentences
        try:
            async with asyncio.timeout(self.config.point_deadline):
                async with contextlib.aclosing(self.backend.stream(request)) as stream:
                    async for chunk in stream:
                        last = chunk
                        if not chunk.text:
                            continue
                        chunks += 1
                        text += chunk.text
                        end = find_point_end(text, max_sentences=max_sentences, start=max(0, emitted - 8))
                        if end is not None:
                            text = text[:end]
                            stopped_early = True
                        safe = len(text) if stopped_early else undecided_tail(text)
                        if safe > emitted:
                            queue.put_nowait(PointDelta(index=index, text=text[emitted:safe]))
                            emitted = safe
                        if stopped_early:
                            break
        except TimeoutError:
            raise BackendTimeoutError(
                f"no complete answer within the {self.config.point_deadline:g} s point deadline"
            ) from None
        if text[emitted:]:
            queue.put_nowait(PointDelta(index=index, text=text[emitted:]))
        if stopped_early:
            finish = "stop"
            tally.add(Chunk(usage=None), chunks)
        else:
            assert last is not None and last.finish_reason is not None
            finish = last.finish_reason
            tally.add(last, chunks)
        return text, finish, chunks

    # -- accounting ---------------------------------------------------------------------------------

    def _backend_counters(self) -> dict[str, Any] | None:
        counters = getattr(self.backend, "counters", None)
        return dict(counters()) if callable(counters) else None

    def _counter_delta(self, before: dict[str, Any] | None) -> dict[str, Any]:
        after = self._backend_counters()
        if before is None or after is None:
            return {}
        delta: dict[str, Any] = {}
        for key, value in after.items():
            old = before.get(key)
            if isinstance(value, int | float) and isinstance(old, int | float):
                delta[key] = value - old
            elif isinstance(value, dict) and isinstance(old, dict):
                delta[key] = {k: v - old.get(k, 0) for k, v in value.items() if v - old.get(k, 0)}
            else:
                delta[key] = value
        return delta


def _cache_key(messages: Sequence[Message]) -> str:
    """One key per question, so an API's prefix cache routes all of its points to the same cache."""
    digest = hashlib.sha256("\x1e".join(f"{m.role}:{m.content}" for m in messages).encode()).hexdigest()
    return f"sot-{digest[:32]}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
