"""The answer text a standard client reads: the engine's events folded into the final answer's text in order
(`AnswerText`), cut at the request's stop strings (`StopFilter`), and the `sot` and `usage` objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sot.core.assemble import clean_point_text, format_point
from sot.events import (
    AnswerDelta,
    Event,
    Fallback,
    PointDelta,
    PointDone,
    PointStarted,
    Result,
    SkeletonDone,
)

_LEADING_MARKS = "*0123456789:：-–—"


def live_expansion(index: int, point: str, raw: str) -> str:
    """The cleaned text of a point still being written, once its start can no longer change; else "".

    The start of a reply may be an echo of the number and the point ("2. Eat greens: ..."), which cleaning
    removes; until enough has arrived to tell, showing any of it could show text the final answer drops.
    """
    probe = raw.replace("\r\n", "\n").lstrip()
    if not probe:
        return ""
    settled = len(probe) >= len(point) + 12
    if not settled:
        echo_possible = point.casefold().startswith(probe.casefold()) or probe.casefold().startswith(point.casefold())
        settled = probe[0] not in _LEADING_MARKS and not echo_possible
    return clean_point_text(index, point, raw) if settled else ""


class AnswerText:
    """Folds engine events into the answer a standard client reads, sent as a growing prefix of it.

    Normal mode: the answer as written (without the leading and trailing whitespace the engine strips).
    SoT mode: point 1 live as "1. <point>: <text>"; later points are held and each is sent as soon as every
    earlier point is done, so the text sent adds up to `Result.answer` exactly. Only text that cannot change
    is sent. The one case where that is impossible: SoT falls back to normal decoding after point 1 was
    already being sent (a point failed twice); the normal answer then follows after a blank line.
    """

    def __init__(self) -> None:
        self.sent = ""
        self._prefix = ""  # what was sent before a fallback to normal decoding
        self._points: list[str] = []
        self._raw: dict[int, str] = {}
        self._done: dict[int, str] = {}
        self._normal: list[str] = []
        self._sot = False
        self._head = 1  # the first point not done yet: the only one whose text can be sent live

    def feed(self, event: Event) -> str:
        """Text to send now because of `event` (often "")."""
        if isinstance(event, SkeletonDone):
            self._points, self._sot = list(event.points), True
        elif isinstance(event, PointStarted):
            self._raw[event.index] = ""  # a retry starts afresh
        elif isinstance(event, PointDelta):
            self._raw[event.index] = self._raw.get(event.index, "") + event.text
            if event.index != self._head:
                return ""  # held until every earlier point is done: nothing to send yet
        elif isinstance(event, PointDone):
            if event.error is None:
                self._done[event.index] = event.text
                while self._head in self._done:
                    self._head += 1
        elif isinstance(event, Fallback):
            self._sot = False
            self._prefix = self.sent + "\n\n" if self.sent else ""
            self._normal = []
        elif isinstance(event, AnswerDelta):
            self._normal.append(event.text)
        else:
            return ""
        return self._advance(self._candidate(), final=False)

    def finish(self, result: Result) -> str:
        """The rest of the answer once the engine is done."""
        return self._advance(self._prefix + result.answer, final=True)

    def _candidate(self) -> str:
        if not self._sot:
            body = "".join(self._normal).strip()
            return self._prefix + body if body else self._prefix.rstrip("\n")
        lines: list[str] = []
        for i, point in enumerate(self._points, start=1):
            if i in self._done:
                lines.append(format_point(i, point, self._done[i]))
                continue
            partial = live_expansion(i, point, self._raw.get(i, ""))
            if partial:
                lines.append(format_point(i, point, partial))
            break
        return "\n".join(lines)

    def _advance(self, candidate: str, *, final: bool) -> str:
        if candidate.startswith(self.sent):
            out = candidate[len(self.sent) :]
        elif final:
            out = "\n\n" + candidate  # cannot happen unless a retried point wrote different text
        else:
            return ""
        self.sent += out
        return out


class StopFilter:
    """Cuts the streamed text at the first of the request's `stop` strings (which are not sent)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        buffer = self._held + text
        found = [buffer.find(s) for s in self.stops if s in buffer]
        if found:
            self.hit, self._held = True, ""
            return buffer[: min(found)]
        # Hold back a tail that could be the start of a stop string.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.hit else out


def sot_info(result: Result) -> dict[str, Any]:
    """The `sot` object of a response, as JSON (stats without the per-token times, which can be long)."""
    return {
        "mode_requested": result.mode_requested,
        "mode_used": result.mode_used,
        "skeleton": result.skeleton,
        "points": result.points,
        "truncated_points": result.truncated_points,
        "fallback_reason": result.fallback_reason,
        "route": result.route.model_dump(mode="json") if result.route else None,
        "backend": result.backend,
        "model": result.model,
        "stats": result.stats.model_dump(mode="json", exclude={"token_times"}),
    }


def usage(result: Result | None) -> dict[str, int] | None:
    """The `usage` object: the engine's measured token counts of the whole run (in SoT mode the skeleton and
    every point together), or None when no run finished, so there is nothing measured to report.

    Never an estimate: a stream cut short by a stop string cancels the engine before it has counted, and its
    usage is then null rather than a guess.
    """
    if result is None:
        return None
    prompt, completion = result.stats.prompt_tokens, result.stats.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
