"""The answer text a standard client reads: the engine's events folded into the final answer's text in order
(`AnswerText`), cut at the request's stop strings (`StopFilter`), and the `sot` and `usage` objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sot.core.answer import AnswerStream
from sot.core.stops import StopHoldback
from sot.events import AnswerDelta, Event, Result


class AnswerText:
    """The answer a standard client reads: the engine's `answer_delta` events, relayed as they come.

    The engine streams the answer in every mode (in SoT mode point 1 live, each later point once every point
    before it is done; after a fallback, normal decoding continues the text already sent), and those deltas
    add up to `Result.answer` exactly, so a stream and a non-streamed response carry the same text.
    """

    def __init__(self) -> None:
        self._sent: list[str] = []

    @property
    def sent(self) -> str:
        return "".join(self._sent)

    def feed(self, event: Event) -> str:
        """Text to send now because of `event` (often "")."""
        if isinstance(event, AnswerDelta):
            self._sent.append(event.text)
            return event.text
        return ""

    def finish(self, result: Result) -> str:
        """The rest of the answer once the engine is done (nothing, when the engine kept its promise)."""
        sent = self.sent
        if result.answer.startswith(sent):
            rest = result.answer[len(sent) :]
            self._sent.append(rest)
            return rest
        return ""


class StopFilter(StopHoldback):
    """Cuts the answer at the first of the request's `stop` strings (which are not sent) and, as at the end of
    every answer, drops the whitespace right before it: the client gets the same text whether the server cut
    the answer here or the upstream stopped at the string itself (a normal answer takes the stops upstream,
    and the engine's answers never end in whitespace). With stops, whitespace is held until text follows it.

    >>> cut = StopFilter(["END"])
    >>> cut.push("Done. "), cut.push("More "), cut.push("text\\nEND"), cut.hit
    ('Done.', ' More', ' text', True)
    """

    def __init__(self, stops: Sequence[str]) -> None:
        super().__init__(stops)
        self._answer = AnswerStream()  # holds trailing whitespace until text follows it

    @property
    def hit(self) -> bool:
        return self.stopped

    def push(self, text: str) -> str:
        out = super().push(text)
        return self._answer.push(out) if self.stops else out

    def flush(self) -> str:
        out = super().flush()
        return self._answer.push(out) if self.stops else out


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
