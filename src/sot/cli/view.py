"""Terminal views of an engine's event stream: a live rich view for people, plain text and JSON for scripts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from sot.events import (
    AnswerDelta,
    Event,
    Fallback,
    PointDelta,
    PointDone,
    PointStarted,
    Result,
    RouteDecided,
    RunStarted,
    SkeletonDelta,
    SkeletonDone,
)


@dataclass
class _Point:
    title: str
    text: str = ""
    state: str = "waiting"  # waiting | running | done | truncated | error


@dataclass
class AnswerView:
    """Folds events into what the screen shows: header, skeleton, each point growing, or plain text."""

    header: str = ""
    notes: list[str] = field(default_factory=list)
    skeleton: str = ""
    points: list[_Point] = field(default_factory=list)
    answer: str = ""
    fell_back: bool = False
    started: float = field(default_factory=time.perf_counter)

    def apply(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.header = f"mode {event.mode} · {event.backend} · {event.model}"
        elif isinstance(event, RouteDecided):
            self.notes.append(f"router ({event.router}) chose {event.mode}: {event.reason}")
        elif isinstance(event, SkeletonDelta):
            self.skeleton += event.text
        elif isinstance(event, SkeletonDone):
            self.points = [_Point(title=p) for p in event.points]
        elif isinstance(event, PointStarted):
            point = self.points[event.index - 1]
            point.state, point.text = "running", ""  # a retry starts the point afresh
        elif isinstance(event, PointDelta):
            self.points[event.index - 1].text += event.text
        elif isinstance(event, PointDone):
            point = self.points[event.index - 1]
            point.text = event.text or point.text
            point.state = "error" if event.error else "truncated" if event.truncated else "done"
        elif isinstance(event, Fallback):
            self.fell_back = True
            self.notes.append(f"fell back to normal decoding: {event.reason}")
        elif isinstance(event, AnswerDelta):
            self.answer += event.text

    def render(self) -> RenderableType:
        parts: list[RenderableType] = [Text(self.header, style="dim")]
        parts.extend(Text(note, style="yellow") for note in self.notes)
        # SoT streams its answer in order too; while it runs, the points filling in parallel are the view.
        showing_points = bool(self.points) and not self.fell_back
        if showing_points:
            table = Table.grid(padding=(0, 1))
            table.add_column(width=2)
            table.add_column()
            for i, point in enumerate(self.points, start=1):
                mark: RenderableType
                if point.state == "running":
                    mark = Spinner("dots", style="cyan")
                elif point.state == "done":
                    mark = Text("✓", style="green")
                elif point.state == "truncated":
                    mark = Text("✂", style="yellow")
                elif point.state == "error":
                    mark = Text("✗", style="red")
                else:
                    mark = Text("·", style="dim")
                line = Text.assemble((f"{i}. {point.title}", "bold"), ": " if point.text else "", point.text.strip())
                table.add_row(mark, line)
            parts.append(table)
        elif self.skeleton and not self.answer:
            parts.append(Text("skeleton\n", style="bold") + Text(self.skeleton.strip(), style="cyan"))
        if self.answer and not showing_points:
            parts.append(Text(self.answer.strip()))
        return Group(*parts)


def summary_line(result: Result) -> str:
    """One line: mode, points, time, tokens, and anything the reader must not miss."""
    s = result.stats
    parts = [f"mode {result.mode_used}"]
    if result.mode_requested != result.mode_used or result.route is not None:
        parts[0] += f" (asked {result.mode_requested})"
    if result.points:
        parts.append(f"{len(result.points)} points")
    parts.append(f"{s.total_seconds:.2f} s")
    if s.time_to_first_token is not None:
        parts.append(f"first token {s.time_to_first_token:.2f} s")
    if s.skeleton_seconds is not None and result.mode_used == "sot":
        parts.append(f"skeleton {s.skeleton_seconds:.2f} s")
    parts.append(f"{s.completion_tokens} tokens")
    if result.fallback_reason:
        parts.append(f"fallback: {result.fallback_reason}")
    if not result.complete:
        cut = f" (points {', '.join(map(str, result.truncated_points))})" if result.truncated_points else ""
        parts.append(f"TRUNCATED by the token limit{cut}")
    return " · ".join(parts)
