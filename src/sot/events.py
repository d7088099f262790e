"""Typed events streamed by every engine run, and the final result they add up to.

The CLI, the server and the web page are views of this one stream. Events are pydantic models with a
`type` tag so they serialize to JSON lines / SSE unchanged and parse back with `EventAdapter`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

Mode = Literal["normal", "sot", "auto"]
UsedMode = Literal["normal", "sot"]
PointFinish = Literal["stop", "length", "error"]


class RunStarted(BaseModel):
    """The run began: what was asked for and on which backend."""

    type: Literal["run_started"] = "run_started"
    mode: Mode
    backend: str
    model: str


class Accepted(BaseModel):
    """The backend accepted the run's first request: the upstream answered with a success status, or the
    embedded engine admitted it. A server decides a streamed response's HTTP status here."""

    type: Literal["accepted"] = "accepted"


class RouteDecided(BaseModel):
    """`auto` mode: the router chose a mode for this question."""

    type: Literal["route_decided"] = "route_decided"
    mode: UsedMode
    router: str
    reason: str
    score: float | None = None


class SkeletonDelta(BaseModel):
    """More skeleton text (the first delta includes the prefill, e.g. "1.")."""

    type: Literal["skeleton_delta"] = "skeleton_delta"
    text: str


class SkeletonDone(BaseModel):
    """The skeleton is complete and parsed."""

    type: Literal["skeleton_done"] = "skeleton_done"
    text: str
    points: list[str]
    seconds: float


class PointStarted(BaseModel):
    """The expansion of point `index` (1-based) was sent to the backend."""

    type: Literal["point_started"] = "point_started"
    index: int
    point: str
    attempt: int = 1


class PointDelta(BaseModel):
    """More of point `index`'s expansion, cleaned: a point's deltas add up to its `PointDone.text`.

    A `PointStarted` with `attempt` > 1 starts the point's text again."""

    type: Literal["point_delta"] = "point_delta"
    index: int
    text: str


class PointDone(BaseModel):
    """Point `index` finished. `truncated` means the token limit cut it: it is not complete."""

    type: Literal["point_done"] = "point_done"
    index: int
    text: str
    finish_reason: PointFinish
    truncated: bool
    tokens: int
    seconds: float
    attempts: int = 1
    error: str | None = None


class AnswerDelta(BaseModel):
    """More of the answer a reader sees, in every mode: all of a run's answer deltas add up to `Result.answer`.

    In SoT mode that is the points in skeleton order (point 1 live, each later point once all before it are
    done); after a fallback, normal decoding continues the text already sent."""

    type: Literal["answer_delta"] = "answer_delta"
    text: str


class Fallback(BaseModel):
    """SoT was abandoned for normal decoding; `reason` says why. Never silent."""

    type: Literal["fallback"] = "fallback"
    reason: str


class PointStats(BaseModel):
    """Timing and size of one point's expansion."""

    index: int
    point: str
    start: float  # seconds since the run started
    seconds: float
    tokens: int
    finish_reason: PointFinish
    attempts: int


class Stats(BaseModel):
    """What a run cost. Times are seconds; `token_times` are the offsets of each streamed chunk of a normal
    answer (about one token each; `sot.eval.equal_length` spreads a reported total over them)."""

    time_to_first_token: float | None = None
    skeleton_seconds: float | None = None
    points: list[PointStats] = Field(default_factory=list)
    total_seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_prompt_tokens: int | None = None
    requests: int = 0  # requests sent to the backend, retries included
    retries: int = 0
    token_times: list[float] = Field(default_factory=list)
    backend: dict[str, Any] = Field(default_factory=dict)

    @property
    def slowest_point_seconds(self) -> float:
        return max((p.seconds for p in self.points), default=0.0)


class Result(BaseModel):
    """The finished answer and how it was produced."""

    mode_requested: Mode
    mode_used: UsedMode
    answer: str
    complete: bool  # false when anything in the answer was cut by a token limit
    finish_reason: Literal["stop", "length"]
    skeleton: str | None = None
    points: list[str] = Field(default_factory=list)
    expansions: list[str] = Field(default_factory=list)
    truncated_points: list[int] = Field(default_factory=list)
    fallback_reason: str | None = None
    route: RouteDecided | None = None
    backend: str
    model: str
    stats: Stats


class Done(BaseModel):
    """The last event of a successful run."""

    type: Literal["done"] = "done"
    result: Result


class ErrorEvent(BaseModel):
    """The run failed; the engine raises the error right after yielding this."""

    type: Literal["error"] = "error"
    error: str
    kind: str


Event = Annotated[
    RunStarted
    | Accepted
    | RouteDecided
    | SkeletonDelta
    | SkeletonDone
    | PointStarted
    | PointDelta
    | PointDone
    | AnswerDelta
    | Fallback
    | Done
    | ErrorEvent,
    Field(discriminator="type"),
]
EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)
