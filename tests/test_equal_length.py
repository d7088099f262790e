"""The equal-length speed-up (`sot.eval.equal_length`): by hand, as properties, and shared by bench and report."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sot.eval.equal_length import Timeline, chunk_token_counts, equal_length_speedup, time_at_length
from sot.events import Stats

# A normal answer: increasing chunk times, an end no earlier than the last chunk, and a reported token total.
times = st.lists(st.floats(0.01, 10.0), min_size=1, max_size=60).map(
    lambda gaps: [sum(gaps[: i + 1]) for i in range(len(gaps))]
)


@st.composite
def timelines(draw: st.DrawFn) -> Timeline:
    chunk_times = draw(times)
    end = chunk_times[-1] + draw(st.floats(0.0, 2.0))
    reported = draw(st.one_of(st.none(), st.integers(0, 3 * len(chunk_times))))
    return Timeline.of(chunk_times, end, reported)


def test_chunks_count_one_token_each_unless_the_backend_reports_more() -> None:
    assert chunk_token_counts(3) == (1, 1, 1)
    assert chunk_token_counts(3, 2) == (1, 1, 1)  # a smaller total never makes a chunk count less than one
    assert chunk_token_counts(3, 7) == (2, 2, 3)  # the surplus spread evenly, all of it
    assert sum(chunk_token_counts(7, 300)) == 300
    assert chunk_token_counts(0, 10) == ()


def test_by_hand() -> None:
    # Four chunks at 1, 2, 3, 4 s; the answer ended at 4.5 s.
    normal = Timeline.of([1.0, 2.0, 3.0, 4.0], total_seconds=4.5)
    assert time_at_length(normal, 1) == 1.0
    assert time_at_length(normal, 3) == 3.0
    assert time_at_length(normal, 4) == 4.5  # the whole answer: done when it finished
    assert time_at_length(normal, 5) is None  # never that long: not extrapolated
    assert time_at_length(normal, 0) is None
    assert equal_length_speedup(normal, 2, 1.0) == 2.0  # normal needed 2 s for the candidate's 2 tokens
    assert equal_length_speedup(normal, 5, 1.0) is None  # the candidate wrote more than normal did
    # A backend that reported 8 tokens over 4 chunks: two tokens a chunk.
    doubled = Timeline.of([1.0, 2.0, 3.0, 4.0], total_seconds=4.5, reported_tokens=8)
    assert doubled.tokens == 8 and time_at_length(doubled, 3) == 2.0 and time_at_length(doubled, 8) == 4.5
    with pytest.raises(ValueError):
        equal_length_speedup(normal, 2, 0.0)


def test_from_the_engine_stats() -> None:
    stats = Stats(token_times=[0.5, 0.6, 0.7], total_seconds=0.8, completion_tokens=3)
    assert Timeline.from_stats(stats) == Timeline((0.5, 0.6, 0.7), (1, 1, 1), 0.8)


@given(timelines(), st.integers(1, 200), st.floats(0.01, 100.0), st.floats(1.0, 10.0))
def test_monotone_in_the_candidates_time(normal: Timeline, tokens: int, seconds: float, slower: float) -> None:
    faster_ratio = equal_length_speedup(normal, tokens, seconds)
    slower_ratio = equal_length_speedup(normal, tokens, seconds * slower)
    assert (faster_ratio is None) == (slower_ratio is None)  # comparability depends on lengths only
    if faster_ratio is not None and slower_ratio is not None:
        assert slower_ratio <= faster_ratio


@given(timelines(), st.floats(0.01, 100.0))
def test_equals_the_plain_speedup_at_equal_length(normal: Timeline, seconds: float) -> None:
    ratio = equal_length_speedup(normal, normal.tokens, seconds)
    assert ratio == pytest.approx(normal.total_seconds / seconds)


@given(timelines(), st.integers(1, 200), st.integers(1, 200), st.floats(0.01, 100.0))
def test_a_longer_candidate_is_compared_with_a_later_time(normal: Timeline, a: int, b: int, seconds: float) -> None:
    short, long = sorted((a, b))
    at_short, at_long = equal_length_speedup(normal, short, seconds), equal_length_speedup(normal, long, seconds)
    if at_long is not None:
        assert at_short is not None and at_short <= at_long
    assert (at_long is None) == (long > normal.tokens)


def test_bench_and_report_use_the_same_definition() -> None:
    """`sot bench` rows and `sot eval report` rows give the same figure for the same two answers."""
    from sot.bench.latency import QuestionTiming
    from sot.eval.summary import equal_length_row

    normal = Stats(token_times=[0.2, 0.4, 0.6, 0.8, 1.0], total_seconds=1.1, completion_tokens=5)
    row = QuestionTiming(
        id="q",
        category="c",
        normal_seconds=1.1,
        sot_seconds=0.25,
        normal_tokens=5,
        sot_tokens=3,
        normal_capped=False,
        sot_capped=False,
        sot_fallback=None,
        skeleton_seconds=0.1,
        slowest_point_seconds=0.15,
        points=2,
        normal_timeline=Timeline.from_stats(normal),
    )
    candidate = Stats(total_seconds=0.25, completion_tokens=3)
    assert row.equal_length_speedup == equal_length_row(normal, candidate) == pytest.approx(0.6 / 0.25)
