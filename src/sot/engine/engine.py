"""`Engine`: answers one question at a time in normal, SoT or auto (routed) mode, as a stream of typed events.

Every run ends, within `EngineConfig.run_deadline`, in a `Done` event or an `ErrorEvent` followed by a
typed `sot.errors` exception. The work of a run happens in one task (and, in SoT mode, the task group of
its skeleton and points); the event stream only reads from it, so a consumer that stops listening (break,
`aclose()`, cancellation) cancels everything the run started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Protocol

from sot.backends.base import Backend, Message, quiet_closed_loop
from sot.core.conversation import Conversation, normalize_conversation
from sot.core.prompts import CHAT, SMOLLM, PromptSet
from sot.engine.calls import cancel_requested
from sot.engine.config import EngineConfig, recommended_sampling
from sot.engine.handle import Emit, Failed, RunHandle
from sot.engine.normal import answer_normally
from sot.engine.run import Run, describe
from sot.engine.sot import SoTAnswer
from sot.errors import BackendTimeoutError, InputError, SoTError
from sot.events import Done, Event, Mode, Result, RouteDecided, RunStarted

MODES = ("normal", "sot", "auto")


class RouterLike(Protocol):
    """What the engine needs of a router (see `sot.router`)."""

    name: str

    async def decide(self, messages: Sequence[Message]) -> Any: ...


class Engine:
    """Answers questions on one backend, in normal, SoT or auto (routed) mode."""

    def __init__(
        self, backend: Backend, config: EngineConfig | None = None, *, router: RouterLike | None = None
    ) -> None:
        self.backend = backend
        # Without a config, generation follows the backend's own recommended settings (the embedded model
        # has a repetition penalty that stops greedy loops), the same for every mode.
        self.config = config or EngineConfig(sampling=recommended_sampling(backend))
        self.router = router

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
        self, conversation: Conversation, mode: Mode = "sot", *, session: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """Answer, yielding events; the last one is `Done` (or `ErrorEvent`, after which the error is raised).

        Bad input raises `InputError` before anything is sent. Stopping iteration early (break, `aclose()`,
        task cancellation) cancels every in-flight request. Every request of the run carries one routing
        key (`GenerationRequest.cache_key`): `session` when given (one per conversation, so a replica's
        prefix cache serves its turns), else one derived from the conversation.
        """
        handle = self.start(conversation, mode, session=session)
        try:
            while batch := await handle.next_batch():
                for event in batch:
                    yield event
        finally:
            await handle.aclose()

    def start(
        self,
        conversation: Conversation,
        mode: Mode = "sot",
        *,
        session: str | None = None,
        observe: Callable[[Event], None] | None = None,
    ) -> RunHandle:
        """Start answering in a task of its own and return its handle, whose `next_batch` hands the events over
        as `stream` yields them (`observe` sees each one as it happens). Bad input raises `InputError` here.
        The caller must `aclose()` the handle."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        messages = normalize_conversation(conversation, max_chars=self.config.max_question_chars)
        return RunHandle(lambda emit: self._work(messages, mode, emit, session), observe)

    async def run(self, conversation: Conversation, mode: Mode = "sot", *, session: str | None = None) -> Result:
        """Answer and return only the final result."""
        async with contextlib.aclosing(self.stream(conversation, mode, session=session)) as events:
            async for event in events:
                if isinstance(event, Done):
                    return event.result
        raise SoTError("the run ended without a result")  # unreachable: a stream ends in Done or raises

    def run_sync(self, conversation: Conversation, mode: Mode = "sot") -> Result:
        """`run` for synchronous callers (not from inside a running event loop). Each call runs in an event loop
        of its own; a backend's HTTP client follows it to the next one (see `sot.backends.base.LoopBound`)."""
        runner = asyncio.Runner()
        loop = runner.get_loop()
        try:
            return runner.run(self.run(conversation, mode))
        finally:
            runner.close()
            quiet_closed_loop(loop)

    async def _work(self, messages: list[Message], mode: Mode, emit: Emit, session: str | None) -> None:
        """The whole run, in this one task; it reports its outcome through `emit` and never raises."""
        run = Run(self.backend, self.config, messages, emit, session)
        counters = self._backend_counters()
        emit(RunStarted(mode=mode, backend=self.backend.name, model=self.backend.model))
        try:
            try:
                async with asyncio.timeout_at(run.deadline.at):
                    result = await self._answer(run, mode)
            except TimeoutError:
                raise BackendTimeoutError(
                    f"the run hit its {self.config.run_deadline:g} s deadline (run_deadline)", backend=self.backend.name
                ) from None
            result.mode_requested = mode
            result.stats = run.finish_stats()
            result.stats.backend = self._counter_delta(counters)
            emit(Done(result=result))
        except SoTError as exc:
            emit(Failed(exc))
        except Exception as exc:  # a bug of ours: still a typed error, with the cause kept
            error = SoTError(f"internal error: {describe(exc)}")
            error.__cause__ = exc
            emit(Failed(error))

    async def _answer(self, run: Run, mode: Mode) -> Result:
        route: RouteDecided | None = None
        used = mode
        if mode == "auto":
            route = await self._route(run)
            run.emit(route)
            used = route.mode
        if used == "sot":
            result = await SoTAnswer(run, self.prompts, prefill=self.use_prefill).answer()
        else:
            result = await answer_normally(run, self.prompts, prefill=self.use_prefill)
        result.route = route
        return result

    async def _route(self, run: Run) -> RouteDecided:
        """The router's choice; a router that fails or takes too long means normal decoding, said so."""
        if self.router is None:
            from sot.router import make_router  # the trained router: offline, milliseconds

            self.router = make_router("trained")
        router = self.router
        try:
            async with asyncio.timeout(min(self.config.route_deadline, max(0.0, run.deadline.left()))):
                decision = await router.decide(run.messages)
            return RouteDecided(
                mode="sot" if decision.use_sot else "normal",
                router=decision.router,
                reason=decision.reason,
                score=decision.score,
            )
        except TimeoutError:
            reason = f"the router gave no decision within {self.config.route_deadline:g} s (route_deadline)"
        except asyncio.CancelledError as exc:
            if cancel_requested():
                raise
            reason = f"the router failed: {describe(exc)}"
        except Exception as exc:
            reason = f"the router failed: {describe(exc)}"
        return RouteDecided(mode="normal", router=getattr(router, "name", "router"), reason=reason)

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
