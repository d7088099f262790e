"""Skeleton parsing: a table of the cases the reference implementation gets wrong, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sot.core.skeleton import _DANGLING, _drop_dangling, overlong_point, parse_skeleton

CASES = [
    ("plain numbered", "1. Sleep\n2. Eat\n3. Move", ["Sleep", "Eat", "Move"]),
    ("parenthesis markers", "1) Sleep\n2) Eat\n3) Move", ["Sleep", "Eat", "Move"]),
    ("dash bullets", "- Sleep\n- Eat\n- Move", ["Sleep", "Eat", "Move"]),
    ("star bullets", "* Sleep\n* Eat\n* Move", ["Sleep", "Eat", "Move"]),
    (
        "point spans lines",
        "1. Set clear goals and\n   priorities\n2. Use a calendar",
        ["Set clear goals and priorities", "Use a calendar"],
    ),
    ("duplicate numbers", "1. Sleep\n1. Eat\n1. Move", ["Sleep", "Eat", "Move"]),
    (
        "cut points lose dangling words",
        "1. It processes data in many dimensions at\n2. Use the\n3. Sign in",
        ["It processes data in many dimensions", "Use", "Sign in"],
    ),
    ("out-of-order numbers", "1. Sleep\n3. Eat\n2. Move", ["Sleep", "Eat", "Move"]),
    ("duplicate points dropped", "1. Sleep\n2. Sleep\n3. Move", ["Sleep", "Move"]),
    ("preamble line", "Here is the skeleton:\n1. Sleep\n2. Eat", ["Sleep", "Eat"]),
    ("preamble with a numbered phrase", "I see 3. key ideas here:\n1. Sleep\n2. Eat", ["Sleep", "Eat"]),
    ("decimal is not a point", "1. Population of 3.5 million\n2. Growth", ["Population of 3.5 million", "Growth"]),
    (
        "decimal line start",
        "1. Costs\n3.5 million people live there\n2. Growth",
        ["Costs 3.5 million people live there", "Growth"],
    ),
    ("sub-points folded", "1. Diet\n   - fruit\n   - fish\n2. Sleep", ["Diet (fruit; fish)", "Sleep"]),
    ("lettered sub-points", "1. Diet\n   a) fruit\n2. Sleep", ["Diet (fruit)", "Sleep"]),
    ("dotted sub-points", "1. Diet\n1.1 fruit\n2. Sleep", ["Diet (fruit)", "Sleep"]),
    ("runaway new question", "1. Sleep\n2. Eat\nQuestion: What is X?\nSkeleton:\n1. Foo", ["Sleep", "Eat"]),
    ("runaway restarted list", "1. Sleep\n2. Eat\n\n1. Foo\n2. Bar", ["Sleep", "Eat"]),
    ("prose after a blank line", "1. Sleep\n2. Eat\n\nThese tips will help you.", ["Sleep", "Eat"]),
    ("markdown bold stripped", "1. **Sleep** well.\n2. __Eat__", ["Sleep well", "Eat"]),
    ("empty point skipped", "1.\n2. Eat\n3. Move", ["Eat", "Move"]),
    ("empty marker filled by next line", "1.\nSleep\n2. Eat", ["Sleep", "Eat"]),
    ("chat template token ends it", "1. Sleep\n2. Eat<|im_end|>", ["Sleep", "Eat"]),
    ("nothing parsable", "I don't know.", []),
    ("empty", "", []),
    ("windows newlines", "1. Sleep\r\n2. Eat\r\n", ["Sleep", "Eat"]),
    (
        "whitespace inside a point is one space",
        "1. Sleep\u2028well\t\n2. Eat\x85greens \u2029\n3. Move\x0b\x0c\u3000\n4. Rest\t \tdaily",
        ["Sleep well", "Eat greens", "Move", "Rest daily"],
    ),
    (
        "dangling word before a colon or semicolon",
        "1. Plan ahead with the :\n2. Sleep well for the;\n3. Use the: timer",
        ["Plan ahead", "Sleep well", "Use the: timer"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in CASES], ids=[c[0] for c in CASES])
def test_parse_table(text: str, expected: list[str]) -> None:
    assert list(parse_skeleton(text).points) == expected


def test_point_cap_and_ended() -> None:
    text = "\n".join(f"{i}. Point {i}" for i in range(1, 20))
    parsed = parse_skeleton(text, max_points=10)
    assert len(parsed.points) == 10
    assert parsed.ended


def test_point_cap_counts_points_filled_from_the_next_line() -> None:
    text = "".join(f"{i}.\nTip {i}\n" for i in range(1, 16))
    parsed = parse_skeleton(text, max_points=10)
    assert parsed.points == tuple(f"Tip {i}" for i in range(1, 11))
    assert parsed.ended
    # Streaming: not over while the 10th point may still grow, over once an 11th marker arrives.
    assert not parse_skeleton(text[: text.index("11.")], final=False).ended
    assert parse_skeleton(text[: text.index("11.") + 4], final=False).ended


def test_a_cap_counts_distinct_points_only() -> None:
    text = "1. Sleep\n  well\n2. Sleep well\n3. Eat\n4. Move"
    parsed = parse_skeleton(text, max_points=3)
    assert parsed.points == ("Sleep well", "Eat", "Move")
    assert not parsed.ended


def test_point_length_cap_cuts_at_a_word() -> None:
    parsed = parse_skeleton("1. " + "word " * 100 + "\n2. B", max_point_chars=30)
    assert len(parsed.points[0]) <= 30
    assert parsed.points[0].endswith("word")


def test_streaming_ignores_the_unfinished_last_line() -> None:
    assert parse_skeleton("1. Sleep\n2. Ea", final=False).points == ("Sleep",)
    assert parse_skeleton("1. Sleep\n2. Eat\nQuestion: x", final=False).ended is False
    assert parse_skeleton("1. Sleep\n2. Eat\nQuestion: x\n", final=False).ended is True


point_text = (
    st.text(
        alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters=" ,'"), min_size=1, max_size=40
    )
    .map(str.strip)
    .filter(lambda s: bool(s) and not s[0].isdigit())
    # A point ending in "and", "the", "of"... was cut mid-phrase; the parser drops such words (a table case).
    .filter(lambda s: s.split(" ")[-1].casefold().strip(",") not in _DANGLING)
)


@given(st.lists(point_text, min_size=1, max_size=15, unique_by=str.casefold), st.sampled_from([". ", ") "]))
def test_numbered_lists_round_trip(points: list[str], marker: str) -> None:
    text = "\n".join(f"{i}{marker}{p}" for i, p in enumerate(points, start=1))
    parsed = parse_skeleton(text, max_points=10, max_point_chars=1000)
    # Runs of spaces inside a point become one; a point of only "," is no point.
    expected = [e for e in (" ".join(p.split()).rstrip(" .;,") for p in points) if e][:10]
    assert list(parsed.points) == expected


@given(st.text(max_size=400), st.integers(1, 12), st.integers(5, 200))
def test_caps_hold_for_any_text(text: str, max_points: int, max_chars: int) -> None:
    parsed = parse_skeleton(text, max_points=max_points, max_point_chars=max_chars)
    assert len(parsed.points) <= max_points
    assert all(0 < len(p) <= max_chars for p in parsed.points)
    assert len({p.casefold() for p in parsed.points}) == len(parsed.points)
    assert all("\n" not in p for p in parsed.points)


@given(
    st.text(alphabet=st.sampled_from(list("ab1.)-*:; \t\n\r\x0b\x0c\x85\u2028\u2029\u3000")), max_size=200),
    st.booleans(),
)
def test_points_are_single_lines_without_edge_whitespace(text: str, final: bool) -> None:
    for point in parse_skeleton(text, final=final).points:
        assert point == point.strip()
        assert point.split() == point.split(" ")  # whitespace inside is single plain spaces
        assert not point.endswith((":", ";", ","))


def test_dangling_words_go_with_the_punctuation_before_them() -> None:
    assert _drop_dangling("Plan ahead with the ;") == "Plan ahead"
    assert _drop_dangling("Eat greens: the") == "Eat greens"
    assert _drop_dangling("The :") == "The"


def test_overlong_point() -> None:
    text = "1. Sleep\n2. Quantum computing is a field that uses quantum"
    assert overlong_point(text, 6) == (45, 2)
    assert overlong_point(text, 9) is None
    assert overlong_point(text, 0) is None  # no limit
    assert overlong_point("1. " + "word " * 5000, 8) == (len("1. " + "word " * 8) - 1, 1)
