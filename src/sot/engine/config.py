"""The engine's settings: answer shape, parallelism, the deadline of every stage, and the retry policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from sot.backends.base import Backend, SamplingParams
from sot.core.prompts import PromptSet
from sot.engine.retry import RetryPolicy
from sot.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of a run. Defaults suit both API models and the embedded model.

    Deadlines (seconds) bound every stage, whatever the backend does: `route_deadline` (the router's
    decision), `skeleton_deadline`, `point_deadline` (each point, its retries included), `normal_deadline`
    (a normal answer, also as SoT's fallback) and `run_deadline` (the whole question). `stall_timeout`
    ends any request that sends nothing for that long, the first token included, so a stalled upstream
    is noticed in seconds rather than at the end of a long stage deadline.
    """

    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompts: PromptSet | None = None  # None: chosen by backend (prefill-capable local models get "smollm")
    use_prefill: bool | None = None  # None: whatever the backend supports
    max_points: int = 10
    min_points: int = 2
    max_point_chars: int = 120
    skeleton_max_tokens: int = 160
    # Cut a skeleton point after this many words (prefill-capable backends only): SmolLM2 sometimes writes
    # sentence-long points, doubling SoT's sequential skeleton time. None: no cut.
    skeleton_point_max_words: int | None = 8
    point_max_tokens: int = 160
    # The completion tokens of the whole answer (skeleton, points and any fallback together), as usage
    # reports them; None: each stage has only its own limit (`sampling.max_tokens` for a normal answer).
    answer_max_tokens: int | None = None
    # Strings that end a normal answer (also SoT's fallback) where the backend generates it, which then stops
    # at once and counts only what it sent: a client's `stop`. The skeleton and the points never get them: a
    # point is not the whole answer, so the server cuts the assembled answer itself (`core.stops`).
    answer_stop: tuple[str, ...] = ()
    max_parallel: int = 16
    route_deadline: float = 10.0
    skeleton_deadline: float = 60.0
    point_deadline: float = 60.0
    normal_deadline: float = 300.0
    run_deadline: float = 600.0
    stall_timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_question_chars: int = 100_000
    # Start expanding a point as soon as its skeleton line is complete, while the skeleton goes on.
    overlap: bool = False
    # End a point after this many sentences; None: as the prompt set says (`PromptSet.point_max_sentences`).
    point_max_sentences: int | None = None

    def __post_init__(self) -> None:
        limits = {
            "route_deadline": self.route_deadline,
            "skeleton_deadline": self.skeleton_deadline,
            "point_deadline": self.point_deadline,
            "normal_deadline": self.normal_deadline,
            "run_deadline": self.run_deadline,
            "stall_timeout": self.stall_timeout,
        }
        for name, value in limits.items():
            if not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.min_points < 1 or self.max_points < self.min_points:
            raise ConfigError(f"need 1 <= min_points <= max_points, got {self.min_points} and {self.max_points}")
        if self.answer_max_tokens is not None and self.answer_max_tokens < 1:
            raise ConfigError(f"answer_max_tokens must be at least 1, not {self.answer_max_tokens}")


def recommended_sampling(backend: Backend) -> SamplingParams:
    """The backend's recommended generation settings, or the generic defaults."""
    sampling = getattr(backend, "default_sampling", None)
    return sampling if isinstance(sampling, SamplingParams) else SamplingParams()
