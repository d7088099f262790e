"""Skeleton-of-Thought, streamed: write the skeleton, expand its points concurrently, send the answer in order.

The algorithm is `reference.answer_with_sot` (skeleton -> parse -> gather(points) -> assemble); this module
adds what streaming and faults need. The skeleton and every point run in one `asyncio.TaskGroup`, so
whatever one of them raises ends the others at once: a point that fails for good (after the retry policy)
cancels its siblings and the answer falls back to normal decoding straight away, continuing the text that
was already sent. The decisions (which points to keep, when a skeleton line is prose, token budgets) are
pure functions in `sot.core.policy`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from sot.backends.base import GenerationRequest
from sot.core.answer import PointsInOrder
from sot.core.live import LivePoint
from sot.core.policy import SkeletonCut, cut_prose_point, keep_points, point_budget, stage_budget, too_few_points
from sot.core.prompts import PromptSet, point_request, render_skeleton, skeleton_request
from sot.core.skeleton import parse_skeleton
from sot.core.stops import find_point_end, undecided_tail
from sot.engine.normal import answer_normally
from sot.engine.run import Run, describe
from sot.errors import AuthenticationError, BackendError, BadRequestError, RateLimitError
from sot.events import (
    Event,
    Fallback,
    PointDelta,
    PointDone,
    PointFinish,
    PointStarted,
    PointStats,
    Result,
    SkeletonDelta,
    SkeletonDone,
)


class PointFailed(Exception):
    """A point failed for good: SoT gives up and falls back."""

    def __init__(self, index: int, attempts: int, error: BackendError) -> None:
        super().__init__(f"point {index} failed after {attempts} attempt(s): {describe(error)}")
        self.index = index


class GiveUp(Exception):
    """SoT cannot go on (a failed skeleton, too few points); the reason is stated in the result."""

    def __init__(self, reason: str, skeleton: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skeleton = skeleton


# Refusals that normal decoding against the same upstream would get too: the run ends with them.
REFUSALS = (AuthenticationError, BadRequestError, RateLimitError)


class SoTAnswer:
    """One question answered with SoT on `run`."""

    def __init__(self, run: Run, prompts: PromptSet, *, prefill: bool) -> None:
        self.run = run
        self.config = run.config
        self.prompts = prompts
        self.prefill = prefill
        self.parallel = asyncio.Semaphore(max(1, self.config.max_parallel))
        self.points: list[str] = []
        self.launched: list[str] = []  # the point texts each expansion was started with, in order
        self.order: PointsInOrder | None = None  # exists once the skeleton is done
        self.held: list[Event] = []  # point events that come before the skeleton is announced as done
        self.point_tokens = self.config.point_max_tokens
        self.tasks: asyncio.TaskGroup | None = None

    async def answer(self) -> Result:
        """The SoT answer, or a normal one that says why SoT gave up."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self.tasks = tasks
                text, finish = await self.skeleton()
                self.finish_skeleton(text, finish)
        except BaseExceptionGroup as group:
            reason, skeleton = self.give_up_reason(group)
            self.run.emit(Fallback(reason=reason))
            return await answer_normally(
                self.run, self.prompts, prefill=self.prefill, fallback_reason=reason, skeleton=skeleton
            )
        return self.result()

    def give_up_reason(self, group: BaseExceptionGroup) -> tuple[str, str | None]:
        """Why SoT stopped, from what its tasks raised; a refusal or anything unexpected is raised instead."""
        errors = _leaves(group)
        for error in errors:
            if isinstance(error, GiveUp):
                return error.reason, error.skeleton
        skeleton = render_skeleton(self.points) if self.points else None
        for error in errors:
            if isinstance(error, PointFailed):
                return str(error), skeleton
        for error in errors:
            if isinstance(error, BackendError) and not isinstance(error, REFUSALS):
                return f"the skeleton request failed: {describe(error)}", None
        raise errors[0]  # a refusal (normal decoding would get it too), or a bug: not ours to hide

    # -- the skeleton -------------------------------------------------------------------------------

    async def skeleton(self) -> tuple[str, str]:
        """Stream the skeleton; return its text and finish reason.

        With a prefill-capable backend, a point that runs past `skeleton_point_max_words` is cut after its
        last allowed word (`cut_prose_point`); the skeleton then ends, or goes on from a new request
        prefilled with the text so far and the next number (a prefix cache makes it cost a few tokens).
        """
        run, config = self.run, self.config
        prompt, text = skeleton_request(self.prompts, run.messages, prefill=self.prefill)
        max_words = config.skeleton_point_max_words if self.prefill else None
        limit = stage_budget(run.tokens_left(), config.skeleton_max_tokens)
        deadline = run.stage_deadline("skeleton_deadline", config.skeleton_deadline)
        if text:
            run.emit(SkeletonDelta(text=text))
        generated = 0
        for _continuation in range(config.max_points + 1):
            state = _SkeletonRequest(text)

            def on_text(piece: str, state: _SkeletonRequest = state, generated: int = generated) -> bool:
                run.clock.mark_token()
                state.chunks += 1
                candidate = state.text + piece
                state.cut = cut_prose_point(
                    candidate,
                    max_words=max_words,
                    generated=generated + state.chunks,
                    max_tokens=limit,
                    max_points=config.max_points,
                )
                if state.cut is not None:
                    state.candidate = candidate
                    return True
                state.text = candidate
                run.emit(SkeletonDelta(text=piece))
                self.launch_early(state.text, piece)
                return "\n" in piece and parse_skeleton(state.text, max_points=config.max_points, final=False).ended

            sampling = replace(config.sampling, max_tokens=max(1, limit - generated))
            request = GenerationRequest(messages=tuple(prompt), sampling=sampling, prefill=text, cache_key=run.key)
            outcome = await run.request("skeleton", request, deadline, on_text, sent=state.streamed)
            generated += outcome.chunks
            if state.cut is None:
                return state.text, "stop" if outcome.finish == "early" else outcome.finish
            end = max(state.cut.end, len(state.text))
            tail = state.candidate[len(state.text) : end] + state.cut.marker
            text = state.candidate[:end] + state.cut.marker
            if tail:
                run.emit(SkeletonDelta(text=tail))
            if not state.cut.goes_on:
                break
        return text, "stop"

    def finish_skeleton(self, text: str, finish: str) -> None:
        """Parse the skeleton, decide whether SoT goes on, and start every point not started yet."""
        config = self.config
        parsed = parse_skeleton(text, max_points=config.max_points, max_point_chars=config.max_point_chars)
        points = keep_points(parsed.points, finish=finish, ended=parsed.ended, started=len(self.launched))
        points[: len(self.launched)] = self.launched  # points already started keep the text they started with
        self.points = points
        self.run.stats.skeleton_seconds = self.run.clock.now()
        self.run.emit(SkeletonDone(text=text, points=points, seconds=self.run.stats.skeleton_seconds))
        reason = too_few_points(points, min_points=config.min_points)
        if reason is not None:
            raise GiveUp(reason, text)
        self.point_tokens = point_budget(
            self.run.tokens_left(), point_max_tokens=config.point_max_tokens, points=len(points)
        )
        self.order = PointsInOrder(points)
        self.run.send_answer(self.order.start())
        held, self.held = self.held, []
        for event in held:
            self.on_point_event(event)
        self.launch(points, shown=points)

    def launch_early(self, skeleton_text: str, piece: str) -> None:
        """Overlap mode: start every point whose skeleton line is complete (the next line has begun)."""
        if not self.config.overlap or "\n" not in piece:
            return
        partial = parse_skeleton(
            skeleton_text, max_points=self.config.max_points, max_point_chars=self.config.max_point_chars, final=False
        )
        complete = list(partial.points[:-1])  # the last line may still wrap onto the next
        for index in range(len(self.launched) + 1, len(complete) + 1):
            self.launch(complete[:index], shown=complete[:index])

    def launch(self, points: Sequence[str], *, shown: Sequence[str]) -> None:
        """Start expanding the points of `points` not started yet; each sees the skeleton as `shown`."""
        if self.tasks is None:
            raise RuntimeError("points are launched inside the answer's task group")
        for index in range(len(self.launched) + 1, len(points) + 1):
            self.launched.append(points[index - 1])
            self.tasks.create_task(self.expand(index, list(shown)))

    # -- the points ---------------------------------------------------------------------------------

    async def expand(self, index: int, shown: list[str]) -> None:
        """Expand point `index` (seeing the skeleton as `shown`); raise `PointFailed` if it fails for good."""
        run, config = self.run, self.config
        point = shown[index - 1]
        request = self.expansion_request(index, shown)
        max_sentences = config.point_max_sentences or self.prompts.point_max_sentences
        if self.point_tokens == 0:  # the answer's token budget is spent: the point stays empty, and cut
            self.point_over(index, point, run.clock.now(), 0.0, text="", finish="length", tokens=0, attempts=0)
            return
        async with self.parallel:
            start = run.clock.now()
            deadline = run.stage_deadline("point_deadline", config.point_deadline)
            state = _PointText(index, point)

            def on_attempt(attempt: int) -> None:
                state.restart(attempt)
                self.on_point_event(PointStarted(index=index, point=point, attempt=attempt))

            def on_text(piece: str) -> bool:
                done = state.add(piece, max_sentences)
                self.send_point_text(index, state.shown())
                return done

            try:
                outcome = await run.request(
                    f"point {index}",
                    request,
                    deadline,
                    on_text,
                    on_attempt=on_attempt,
                    sent=lambda: self.sent(index),
                )
            except BackendError as exc:
                self.point_over(
                    index,
                    point,
                    start,
                    run.clock.now() - start,
                    text="",
                    finish="error",
                    tokens=0,
                    attempts=state.attempts,
                    error=describe(exc),
                )
                raise PointFailed(index, state.attempts, exc) from exc
            self.send_point_text(index, state.flush())
            self.point_over(
                index,
                point,
                start,
                run.clock.now() - start,
                text=state.final,
                finish="length" if outcome.finish == "length" else "stop",
                tokens=outcome.chunks,
                attempts=state.attempts,
            )

    def expansion_request(self, index: int, shown: list[str]) -> GenerationRequest:
        """The request that expands point `index`, seeing the skeleton as `shown`."""
        prompt, prefill = point_request(self.prompts, self.run.messages, shown, index, prefill=self.prefill)
        sampling = replace(self.config.sampling, max_tokens=self.point_tokens)
        return GenerationRequest(
            messages=tuple(prompt), sampling=sampling, prefill=prefill, stop=("\n\n",), cache_key=self.run.key
        )

    def send_point_text(self, index: int, text: str) -> None:
        if text:
            self.on_point_event(PointDelta(index=index, text=text))

    def sent(self, index: int) -> bool:
        """Whether any of point `index`'s expansion is in the answer already (it cannot be retried then)."""
        return self.order is not None and self.order.body_sent(index)

    def on_point_event(self, event: Event) -> None:
        """Send a point's event, and the answer text it makes sendable; held until the skeleton is done."""
        if self.order is None:
            self.held.append(event)
            return
        self.run.emit(event)
        if isinstance(event, PointStarted) and event.attempt > 1:
            self.order.reset(event.index)
        elif isinstance(event, PointDelta):
            self.run.send_answer(self.order.add(event.index, event.text))
        elif isinstance(event, PointDone) and event.error is None:
            self.run.send_answer(self.order.point_done(event.index, event.text))

    def point_over(
        self,
        index: int,
        point: str,
        start: float,
        seconds: float,
        *,
        text: str,
        finish: PointFinish,
        tokens: int,
        attempts: int,
        error: str | None = None,
    ) -> None:
        """Point `index` is over: its statistics for the result, and its `point_done` event."""
        stats = PointStats(
            index=index,
            point=point,
            start=start,
            seconds=seconds,
            tokens=tokens,
            finish_reason=finish,
            attempts=attempts,
        )
        self.run.stats.points.append(stats)
        done = PointDone(
            index=index,
            text=text,
            finish_reason=finish,
            truncated=finish == "length",
            tokens=tokens,
            seconds=seconds,
            attempts=attempts,
            error=error,
        )
        self.on_point_event(done)

    def result(self) -> Result:
        order = self.order
        if order is None:
            raise RuntimeError("the SoT answer is complete only after its skeleton")
        stats = self.run.stats
        stats.points.sort(key=lambda p: p.index)
        truncated = [p.index for p in stats.points if p.finish_reason == "length"]
        return Result(
            mode_requested="sot",
            mode_used="sot",
            answer=self.run.sent,
            complete=not truncated,
            finish_reason="length" if truncated else "stop",
            skeleton=render_skeleton(self.points),
            points=self.points,
            expansions=order.expansions,
            truncated_points=truncated,
            backend=self.run.backend.name,
            model=self.run.backend.model,
            stats=stats,
        )


class _SkeletonRequest:
    """What one skeleton request has produced so far."""

    def __init__(self, text: str) -> None:
        self.start = text
        self.text = text
        self.chunks = 0
        self.candidate = text
        self.cut: SkeletonCut | None = None

    def streamed(self) -> bool:
        """Whether readers have seen text of this request (then it is not retried)."""
        return self.text != self.start


class _PointText:
    """One point's raw text as it streams, cut where the point ends, and its clean text for readers."""

    def __init__(self, index: int, point: str) -> None:
        self.index = index
        self.point = point
        self.attempts = 0
        self.restart(0)

    def restart(self, attempt: int) -> None:
        self.attempts = attempt
        self.raw = ""
        self.fed = 0  # raw characters given to `live`
        self.live = LivePoint(self.index, self.point)
        self.pending = ""
        self.final = ""
        self.ended = False

    def add(self, piece: str, max_sentences: int | None) -> bool:
        """Take more raw text; return True once the point's end is found (stop reading)."""
        scanned = len(self.raw)
        self.raw += piece
        end = find_point_end(self.raw, max_sentences=max_sentences, start=max(0, scanned - 8))
        if end is not None:
            self.raw = self.raw[:end]
            self.ended = True
        safe = len(self.raw) if self.ended else undecided_tail(self.raw)
        if safe > self.fed:
            self.pending += self.live.push(self.raw[self.fed : safe])
            self.fed = safe
        return self.ended

    def shown(self) -> str:
        out, self.pending = self.pending, ""
        self.final += out
        return out

    def flush(self) -> str:
        """The rest of the clean text once the point is over."""
        if len(self.raw) > self.fed:
            self.pending += self.live.push(self.raw[self.fed :])
            self.fed = len(self.raw)
        self.pending += self.live.flush()
        return self.shown()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for error in group.exceptions:
        out.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return out
