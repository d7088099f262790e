"""The pure text functions under fuzzing (slow: over 100,000 generated inputs) and on long adversarial inputs."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sot.core.assemble import assemble_answer, clean_point_text, format_point
from sot.core.live import LivePoint
from sot.core.skeleton import _cap, _drop_dangling, overlong_point, parse_skeleton
from sot.core.stops import StopHoldback, find_point_end, undecided_tail

# -- strategies: text made of the pieces the parsers care about ---------------------------------------------
# Hypothesis draws plain characters fast; private-use placeholders among them stand for multi-character pieces.

PIECES = {
    "\ue000": "e.g. ",
    "\ue001": "i.e.",
    "\ue002": "Dr. ",
    "\ue003": "p.m.",
    "\ue004": "\r\n",
    "\ue005": "**",
    "\ue006": "3.5",
    "\ue007": "1.1 ",
    "\ue008": "a) ",
    "\ue009": " the",
    "\ue00a": " and",
    "\ue00b": "Eat greens",
    "\ue00c": "Sleep",
    "\ue00d": "Question:",
    "\ue00e": "<|im_end|>",
    "\ue00f": "\n2. ",
    "\ue010": "\n\n",
    "\ue011": "123",
}
# A list, not a set: repeated characters are drawn more often.
ALPHABET = list(
    "".join(
        [
            "0123456789",
            "12." * 4,
            "\n" * 4,
            ")-—*•:：;,!?\"'’",
            "\n\n\n\r\t  \u2028\u2029\x85\x0b\x0c\u3000\xa0",
            "abeEgGsSxX",
            "ßİé中\u200b\x00",
            *PIECES,
        ]
    )
)


def _expand(text: str) -> str:
    return "".join(PIECES.get(c, c) for c in text)


def texts(max_size: int = 60) -> st.SearchStrategy[str]:
    return st.text(alphabet=st.sampled_from(ALPHABET), max_size=max_size).map(_expand)


points = st.one_of(st.sampled_from(["Eat greens", "Sleep", "e.g.", "1", "", "**", "ß", "a b"]), texts(8))
# A raw expansion that often starts with an echo of its number, its point and a separator.
replies = st.tuples(
    points,
    st.sampled_from(["", "2.", " 2. ", "**2)** ", "\n2.\n", "12 ."]),
    st.sampled_from(["", "same", "upper", "bold", "half"]),
    st.sampled_from(["", ":", " : ", "** - ", "—", "\t:\u2028"]),
    texts(),
)


def reply(case: tuple[str, str, str, str, str]) -> tuple[str, str]:
    point, head, echo, separator, body = case
    echoes = {"": "", "same": point, "upper": point.upper(), "bold": f"**{point}**", "half": point[: len(point) // 2]}
    return point, head + echoes[echo] + separator + body


def chunks(text: str, sizes: bytes) -> list[str]:
    """`text` cut into pieces of the given sizes (0 to 15, so some are empty), the rest as the last piece."""
    pieces, at = [], 0
    for size in sizes:
        pieces.append(text[at : at + size % 16])
        at += size % 16
    return [*pieces, text[at:]]


def fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Slow-marked, with an explicit number of examples (the file's total is over 100,000)."""

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(test)
        return pytest.mark.slow(configured)

    return wrap


# -- fuzzing -----------------------------------------------------------------------------------------------


@fuzz(20_000)
@given(texts(80), st.integers(0, 12), st.integers(0, 150), st.booleans())
def test_parse_skeleton(text: str, max_points: int, max_chars: int, final: bool) -> None:
    parsed = parse_skeleton(text, max_points=max_points, max_point_chars=max_chars, final=final)
    assert isinstance(parsed.ended, bool)
    assert len(parsed.points) <= max_points
    for point in parsed.points:
        assert point
        assert point == point.strip()
        assert not any(c.isspace() and c != " " for c in point)  # no newline, tab or Unicode separator
        assert "  " not in point
        assert len(point) <= max_chars
    assert len({p.casefold() for p in parsed.points}) == len(parsed.points)


@fuzz(12_000)
@given(replies)
def test_clean_point_text(case: tuple[str, str, str, str, str]) -> None:
    point, raw = reply(case)
    text = clean_point_text(2, point, raw)
    assert text == text.strip()
    assert text in raw.replace("\r\n", "\n")  # cleaning only cuts


@fuzz(12_000)
@given(texts(), st.sampled_from([None, 0, 1, 2, 3, 10]), texts(6))
def test_find_point_end_and_undecided_tail(text: str, max_sentences: int | None, more: str) -> None:
    block = find_point_end(text)
    assert block is None or (0 <= block < len(text) and text[block] == "\n")
    end = find_point_end(text, max_sentences=max_sentences)
    assert end is None or 0 <= end <= len(text)
    if block is not None:
        assert end is not None and end <= block
    # A streaming caller scanning from part-way finds the same block end.
    for start in (0, len(text) // 2, max(0, len(text) - 8)):
        found = find_point_end(text, start=start)
        assert found is None or found >= start
        assert found == block or (block is not None and block < start)
    held = undecided_tail(text)
    assert 0 <= held <= len(text)
    assert held == len(text) or text[held] == "\n"
    if block is None:  # what was not held back never becomes part of a block end
        later = find_point_end(text + more)
        assert later is None or later >= held


@fuzz(6_000)
@given(texts(), st.integers(-1, 12))
def test_overlong_point(text: str, max_words: int) -> None:
    found = overlong_point(text, max_words)
    if found is not None:
        end, number = found
        line_start = text.rfind("\n") + 1
        assert line_start < end <= len(text)
        assert len(text[line_start:end].split()) == max_words + 1  # the marker, then max_words words
        assert number == int(text[line_start:end].split()[0][:-1])


@fuzz(10_000)
@given(st.lists(st.tuples(points, texts(16)), max_size=5))
def test_format_point_and_assemble_answer(items: list[tuple[str, str]]) -> None:
    names = [point for point, _ in items]
    expansions = [expansion for _, expansion in items]
    answer = assemble_answer(names, expansions)
    assert answer == "\n".join(format_point(i, p, e) for i, (p, e) in enumerate(items, start=1))
    for i, (point, expansion) in enumerate(items, start=1):
        formatted = format_point(i, point, expansion)
        assert formatted.startswith(f"{i}. {point}")
        assert formatted.count("\n") == point.count("\n") + expansion.count("\n")
    with pytest.raises(ValueError):
        assemble_answer([*names, "extra"], expansions)


STOP_ALPHABET = "ab\n</s>#"


@fuzz(22_000)
@given(
    st.lists(st.text(STOP_ALPHABET, max_size=5), max_size=3),
    st.text(STOP_ALPHABET, max_size=40),
    st.binary(max_size=10),
)
def test_stop_holdback(stops: list[str], text: str, sizes: bytes) -> None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    expected = text[: min(found)] if found else text
    cutter = StopHoldback(stops)
    pieces = [cutter.push(chunk) for chunk in chunks(text, sizes)]
    out = "".join(pieces) + cutter.flush()
    assert out == expected
    assert cutter.stopped == bool(found)
    assert not any(stop in out for stop in stops if stop)


@fuzz(25_000)
@given(replies, st.binary(max_size=12))
def test_live_point(case: tuple[str, str, str, str, str], sizes: bytes) -> None:
    point, raw = reply(case)
    live = LivePoint(2, point)
    pieces = [live.push(chunk) for chunk in chunks(raw, sizes)]
    assert "".join(pieces) + live.flush() == clean_point_text(2, point, raw)


# -- scaling: every function stays linear on long adversarial inputs ------------------------------------------

SIZE = 16_000


def _repeat(unit: str) -> str:
    return (unit * (SIZE // len(unit) + 1))[:SIZE]


ADVERSARIAL = {
    "spaces": " " * SIZE,
    "tabs": "\t" * SIZE,
    "newlines": "\n" * SIZE,
    "crlf": "\r\n" * (SIZE // 2),
    "line separators": "\u2028" * SIZE,
    "stars": "*" * SIZE,
    "periods": "." * SIZE,
    "digits": "7" * SIZE,
    "letters": "x" * SIZE,
    "e.g.": _repeat("e.g. "),
    "empty markers": _repeat("1.\nx\n"),
    "distinct empty markers": "".join(f"{i % 8 + 2}.\nw{i}\n" for i in range(2300))[:SIZE],
    "numbered": _repeat("1. "),
    "digits and periods": _repeat("1234."),
    "newline, space": _repeat("\n "),
    "newline, digit": _repeat("\n1"),
    "bullets": _repeat("* "),
    "bold": _repeat("** "),
    "colons": _repeat(": "),
    "dangling words": _repeat("the "),
    "spaces then text": " " * (SIZE - 1) + "x",
}


def _stream(make: Callable[[], StopHoldback | LivePoint], text: str, size: int = 4) -> str:
    stream = make()
    return "".join(stream.push(text[i : i + size]) for i in range(0, len(text), size)) + stream.flush()


SCALED: dict[str, Callable[[str], object]] = {
    "parse_skeleton": parse_skeleton,
    "parse_skeleton final=False": lambda text: parse_skeleton(text, final=False),
    "clean_point_text": lambda text: clean_point_text(1, "p", text),
    "clean_point_text echo": lambda text: clean_point_text(1, text[:100], text),
    "find_point_end": find_point_end,
    "find_point_end max_sentences": lambda text: find_point_end(text, max_sentences=SIZE),
    "undecided_tail": undecided_tail,
    "overlong_point": lambda text: overlong_point("1. " + text, 8),
    "_drop_dangling": _drop_dangling,
    "_cap": lambda text: _cap(text, 120),
    "format_point": lambda text: format_point(1, "p", text),
    "assemble_answer": lambda text: assemble_answer(["p", "q"], [text, text]),
    "StopHoldback": lambda text: _stream(lambda: StopHoldback(["\n\n", "</s>", "e.g. e.g. x", "1.\nx\n2."]), text),
    "LivePoint": lambda text: _stream(lambda: LivePoint(1, "p"), text),
}


@pytest.mark.parametrize("name", list(SCALED))
def test_linear_on_adversarial_input(name: str) -> None:
    """Under 50 ms of CPU time each (the best of 3: CPU time, as other jobs may share the machine's cores)."""
    function = SCALED[name]
    slow = {}
    for kind, text in ADVERSARIAL.items():
        best = float("inf")
        for _ in range(3):
            began = time.process_time()
            function(text)
            best = min(best, time.process_time() - began)
            if best > 1:
                break  # quadratic: no need to wait for more
        if best > 0.05:
            slow[kind] = round(best * 1000)
    assert not slow, f"{name} took over 50 ms (ms per input): {slow}"
