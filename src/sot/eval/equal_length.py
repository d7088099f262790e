"""The equal-length speed-up, defined once: a candidate's time against normal decoding's time to as many tokens.

A plain speed-up (normal latency / candidate latency) mixes two things: answering faster and writing less.
The equal-length speed-up compares the candidate's latency with the moment normal decoding had produced as
many tokens as the candidate's whole answer has, so it measures only the first.

Where the times come from: `Stats.token_times` holds one time (seconds since the run started) per *text
chunk* of a normal answer, the moment the engine received it. No backend reports how many tokens a chunk
carried, so each chunk counts as one token, unless the backend's reported total (`completion_tokens`, from
its usage) is larger: then the surplus (tokens whose text was held back, such as a character split across
tokens, and released with a later chunk) is spread evenly over the chunks (`chunk_token_counts`). Normal
decoding "had produced" `n` tokens at the first chunk whose running count reaches `n`; at its whole length,
at its total time (the answer was done when it finished).

A candidate answer longer than the normal one cannot be compared: normal decoding never produced that many
tokens, and its pace beyond its end would be a guess. Such questions get no equal-length speed-up (None);
callers count and report them rather than extrapolate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sot.events import Stats


def chunk_token_counts(chunks: int, reported_tokens: int | None = None) -> tuple[int, ...]:
    """Tokens each of `chunks` streamed chunks carried: one each, a larger reported total spread evenly.

    >>> chunk_token_counts(4)
    (1, 1, 1, 1)
    >>> chunk_token_counts(4, 6)
    (1, 2, 1, 2)
    >>> chunk_token_counts(4, 3)  # fewer tokens reported than chunks: each chunk still counts one
    (1, 1, 1, 1)
    """
    if chunks <= 0:
        return ()
    total = max(chunks, reported_tokens or 0)
    return tuple((i + 1) * total // chunks - i * total // chunks for i in range(chunks))


@dataclass(frozen=True, slots=True)
class Timeline:
    """When an answer's tokens arrived: one time per chunk, the tokens of each chunk, and its total time."""

    times: tuple[float, ...]
    counts: tuple[int, ...]
    total_seconds: float

    def __post_init__(self) -> None:
        if len(self.times) != len(self.counts):
            raise ValueError("one token count per chunk time")

    @property
    def tokens(self) -> int:
        """The answer's length in tokens."""
        return sum(self.counts)

    @classmethod
    def of(cls, times: Sequence[float], total_seconds: float, reported_tokens: int | None = None) -> Timeline:
        """From per-chunk times and the backend's reported token total (see the module docstring)."""
        return cls(tuple(times), chunk_token_counts(len(times), reported_tokens), total_seconds)

    @classmethod
    def from_stats(cls, stats: Stats) -> Timeline:
        """A normal answer's timeline from the engine's stats."""
        return cls.of(stats.token_times, stats.total_seconds, stats.completion_tokens)


def time_at_length(timeline: Timeline, tokens: int) -> float | None:
    """When the answer had produced `tokens` tokens; None when it never did (or `tokens` < 1).

    >>> line = Timeline.of([0.5, 1.0, 1.5], total_seconds=1.6)
    >>> time_at_length(line, 2), time_at_length(line, 3), time_at_length(line, 4)
    (1.0, 1.6, None)
    """
    if tokens < 1 or tokens > timeline.tokens:
        return None
    if tokens == timeline.tokens:
        return timeline.total_seconds
    produced = 0
    for time, count in zip(timeline.times, timeline.counts, strict=True):
        produced += count
        if produced >= tokens:
            return time
    return None  # unreachable: tokens < timeline.tokens


def equal_length_speedup(normal: Timeline, candidate_tokens: int, candidate_seconds: float) -> float | None:
    """Normal decoding's time to the candidate's length, over the candidate's time; None when not comparable.

    Not comparable: the normal answer is shorter than the candidate's (it never got that far), or the
    candidate wrote nothing.

    >>> normal = Timeline.of([1.0, 2.0, 3.0, 4.0], total_seconds=4.0)
    >>> equal_length_speedup(normal, 2, 1.0), equal_length_speedup(normal, 4, 2.0), equal_length_speedup(normal, 5, 1.0)
    (2.0, 2.0, None)
    """
    if candidate_seconds <= 0:
        raise ValueError("the candidate's latency must be positive")
    reached = time_at_length(normal, candidate_tokens)
    if reached is None or reached <= 0:
        return None
    return reached / candidate_seconds
