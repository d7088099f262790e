"""What one question's run shares (clock, tallies, budgets, deadlines, the answer sent so far), and the
request loop that applies the retry policy to every backend call."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sot.backends.base import Backend, GenerationRequest, Message
from sot.engine.calls import CallOutcome, Deadline, TextSink, call_backend, earliest
from sot.engine.config import EngineConfig
from sot.engine.retry import RetryBudget
from sot.errors import BackendError
from sot.events import Accepted, AnswerDelta, Event, Stats

Emit = Callable[[Event], None]


@dataclass
class Clock:
    """Seconds since the run started, and when its first token came."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.start

    def mark_token(self) -> None:
        if self.first_token is None:
            self.first_token = self.now()


@dataclass
class Tally:
    """Requests and tokens of a run, from the backends' own usage where they report it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_prompt_tokens: int | None = None
    requests: int = 0

    def add(self, outcome: CallOutcome) -> None:
        usage = outcome.usage
        if usage is None:
            self.completion_tokens += outcome.chunks
            return
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens or outcome.chunks
        if usage.computed_prompt_tokens is not None:
            self.computed_prompt_tokens = (self.computed_prompt_tokens or 0) + usage.computed_prompt_tokens


class Run:
    """One question being answered: the state every stage of it reads and writes."""

    def __init__(
        self, backend: Backend, config: EngineConfig, messages: list[Message], emit: Emit, session: str | None = None
    ) -> None:
        self.backend = backend
        # One key on every request of the question (and of a conversation, when the caller names a session),
        # so an API's prefix cache, or a load balancer hashing on it, keeps them on one replica.
        self.key = session or cache_key(messages)
        self.config = config
        self.messages = messages
        self.emit = emit
        self.clock = Clock()
        self.tally = Tally()
        self.stats = Stats()
        self.budget = RetryBudget(config.retry.budget)
        self.deadline = Deadline.after("run_deadline", config.run_deadline)
        self._sent: list[str] = []  # the answer text sent so far (AnswerDelta events), in pieces
        self.accepted = False

    def stage_deadline(self, name: str, seconds: float) -> Deadline:
        """A stage's deadline, starting now, never later than the run's."""
        return earliest(Deadline.after(name, seconds), self.deadline)

    def tokens_left(self) -> int | None:
        """What is left of the answer's completion-token budget (None: no budget)."""
        limit = self.config.answer_max_tokens
        return None if limit is None else max(0, limit - self.tally.completion_tokens)

    @property
    def sent(self) -> str:
        """The answer text sent so far."""
        return "".join(self._sent)

    def send_answer(self, text: str) -> None:
        if text:
            self._sent.append(text)
            self.emit(AnswerDelta(text=text))

    def mark_accepted(self) -> None:
        if not self.accepted:
            self.accepted = True
            self.emit(Accepted())

    async def request(
        self,
        stage: str,
        request: GenerationRequest,
        deadline: Deadline,
        on_text: TextSink,
        *,
        on_attempt: Callable[[int], None] = lambda attempt: None,
        sent: Callable[[], bool] = lambda: False,
    ) -> CallOutcome:
        """Send `request`, retried as the policy allows while nothing of it has been sent on (`sent`)."""
        attempt = 0
        while True:
            attempt += 1
            on_attempt(attempt)
            self.tally.requests += 1
            try:
                outcome = await call_backend(
                    self.backend,
                    request,
                    stage=stage,
                    deadline=deadline,
                    stall_timeout=self.config.stall_timeout,
                    on_text=on_text,
                    on_accepted=self.mark_accepted,
                )
            except BackendError as exc:
                wait = (
                    None
                    if sent()
                    else self.config.retry.delay(exc, attempt, time_left=deadline.left(), budget=self.budget)
                )
                if wait is None:
                    if attempt > 1:
                        exc.add_note(f"gave up after {attempt} attempts")
                    raise
                await asyncio.sleep(wait)
                if sent():  # meanwhile its text reached the answer (an earlier point finished): too late to retry
                    exc.add_note(
                        f"not retried: its text was sent during the {wait:.2f} s wait before attempt {attempt + 1}"
                    )
                    raise
                continue
            self.tally.add(outcome)
            return outcome

    def finish_stats(self) -> Stats:
        stats = self.stats
        stats.total_seconds = self.clock.now()
        stats.time_to_first_token = self.clock.first_token
        stats.prompt_tokens = self.tally.prompt_tokens
        stats.completion_tokens = self.tally.completion_tokens
        stats.computed_prompt_tokens = self.tally.computed_prompt_tokens
        stats.requests = self.tally.requests
        stats.retries = self.budget.spent
        return stats


def cache_key(messages: Sequence[Message]) -> str:
    """One key per question, so an API's prefix cache routes all of its points to the same cache."""
    text = "\x1e".join(f"{m.role}:{m.content}" for m in messages)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()  # never raises on bad text
    return f"sot-{digest[:32]}"


def describe(exc: BaseException) -> str:
    """An error in a few words, for fallback reasons and point errors."""
    return f"{type(exc).__name__}: {exc}"
