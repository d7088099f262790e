"""Prompt rendering (both styles, both layouts, the paper's files) and answer assembly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sot.backends.base import Message
from sot.core.assemble import assemble_answer, clean_point_text, format_point
from sot.core.live import LivePoint
from sot.core.prompts import CHAT, SMOLLM, fill, parse_prompt_set, point_request, skeleton_request
from sot.core.stops import StopHoldback, find_point_end, undecided_tail
from sot.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONVERSATION = [Message("user", "How do I {sleep} better?\n1. not a point")]
POINTS = ["Keep a schedule", "Dim the lights", "Skip late coffee"]


def test_fill_is_literal_and_leaves_unknown_braces() -> None:
    assert fill("{question} {x}", question="{point} {index}") == "{point} {index} {x}"


def test_skeleton_prefill_style_has_examples_then_question_and_prefill() -> None:
    messages, prefill = skeleton_request(SMOLLM, CONVERSATION, prefill=True)
    assert prefill == "1."
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert "How do I {sleep} better?\n1. not a point" in messages[-1].content


def test_skeleton_instruction_style_asks_to_start_with_one() -> None:
    messages, prefill = skeleton_request(CHAT, CONVERSATION, prefill=False)
    assert prefill == ""
    assert messages[0].role == "system"
    assert 'Start your reply with "1."' in messages[-1].content


def test_point_prompts_share_their_prefix_and_differ_only_at_the_end() -> None:
    rendered = []
    for i in range(1, 4):
        messages, prefill = point_request(SMOLLM, CONVERSATION, POINTS, i, prefill=True)
        rendered.append((messages, prefill))
        assert prefill == f"{i}. {POINTS[i - 1]}:"
    skeleton_messages, _ = skeleton_request(SMOLLM, CONVERSATION, prefill=True)
    for messages, _ in rendered:
        # The point prompt is the skeleton conversation, the skeleton as reply, then one short request.
        assert messages[: len(skeleton_messages)] == skeleton_messages
        assert messages[len(skeleton_messages)] == Message(
            "assistant", "1. Keep a schedule\n2. Dim the lights\n3. Skip late coffee"
        )
        assert len(messages) == len(skeleton_messages) + 2
    # With a prefill, the point's own text lives only there: every point shares all of its messages, so a
    # prefix cache computes them once. Without one, the request must name its point in the user turn.
    assert all(messages == rendered[0][0] for messages, _ in rendered)
    instructed = {point_request(SMOLLM, CONVERSATION, POINTS, i, prefill=False)[0][-1].content for i in (1, 2, 3)}
    assert len(instructed) == 3
    assert all(f'"{i}. {POINTS[i - 1]}:"' in text for i, text in zip((1, 2, 3), sorted(instructed), strict=True))


def test_multi_turn_history_reaches_both_stages() -> None:
    conversation = [Message("user", "I work nights."), Message("assistant", "Noted."), Message("user", "Tips?")]
    skeleton, _ = skeleton_request(SMOLLM, conversation, prefill=True)
    point, _ = point_request(SMOLLM, conversation, POINTS, 1, prefill=True)
    for messages in (skeleton, point):
        assert Message("user", "I work nights.") in messages
        assert Message("assistant", "Noted.") in messages


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not present")
@pytest.mark.parametrize("name", ["sot_opensource.json", "sot_gpt4.json", "sot_claude.json"])
def test_paper_prompt_files_load(name: str) -> None:
    prompts = parse_prompt_set((SHARED / "reference" / name).read_text(), name=name)
    assert prompts.point_layout == "standalone"
    assert "[ROLESWITCHING" not in prompts.skeleton_user + prompts.point_user
    messages, prefill = point_request(prompts, CONVERSATION, POINTS, 2, prefill=True)
    assert prefill.startswith("2. Dim the lights")
    assert "How do I {sleep} better?" in messages[-1].content
    assert "1. Keep a schedule\n2. Dim the lights" in messages[-1].content


def test_own_format_file_and_bad_files() -> None:
    data = SMOLLM.model_dump(mode="json")
    data["name"] = "mine"
    assert parse_prompt_set(json.dumps(data)).name == "mine"
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_prompt_set("{nope")
    with pytest.raises(ConfigError, match="not a valid prompt set"):
        parse_prompt_set('{"skeleton_user": "x"}')


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Keep the same bedtime.", "Keep the same bedtime."),
        ("2. Dim the lights: Use lamps.", "Use lamps."),
        ("**Dim the lights**: Use lamps.", "Use lamps."),
        ("dim the lights - Use lamps.", "Use lamps."),
        ("Use lamps.\n3. Skip late coffee: no", "Use lamps."),
        ("", ""),
        ("\t2) **Dim the lights** — Use lamps.\t\u2028", "Use lamps."),
        ("Use lamps.\x85\x0b\x0c\u2029 \t", "Use lamps."),
        ("Use lamps.\n  \n\t 3. Skip late coffee", "Use lamps."),
        ("\r\n2.\r\n3. Skip late coffee", ""),
        ("Use lamps. Costs 3.5 dollars.\n3.5 million", "Use lamps. Costs 3.5 dollars.\n3.5 million"),
    ],
)
def test_clean_point_text_removes_echoed_prefix(raw: str, expected: str) -> None:
    assert clean_point_text(2, "Dim the lights", raw) == expected


def test_assemble_keeps_order_numbers_and_skeleton_text() -> None:
    answer = assemble_answer(POINTS, ["A.", "", "C."])
    assert answer.splitlines() == ["1. Keep a schedule: A.", "2. Dim the lights", "3. Skip late coffee: C."]
    with pytest.raises(ValueError):
        assemble_answer(POINTS, ["only one"])


@pytest.mark.parametrize(
    ("text", "max_sentences", "expected"),
    [
        ("Keep a routine.\n\nAlso, hello there", None, "Keep a routine."),
        ("Keep a routine.\n3. Next point", None, "Keep a routine."),
        ("Keep a routine. Sleep 8 hours. Wake early. ", 2, "Keep a routine. Sleep 8 hours."),
        ("Costs 3.5 dollars, e.g. at Dr. Who's. Yes! More text ", 2, "Costs 3.5 dollars, e.g. at Dr. Who's. Yes!"),
        ("One sentence still going", 2, None),
        ("Short. Still writing", 2, None),
    ],
)
def test_point_end(text: str, max_sentences: int | None, expected: str | None) -> None:
    end = find_point_end(text, max_sentences=max_sentences)
    assert (None if end is None else text[:end]) == expected


def test_undecided_tail_holds_back_a_possible_next_number() -> None:
    assert undecided_tail("Keep a routine.\n3") == len("Keep a routine.")
    assert undecided_tail("Keep a routine.") == len("Keep a routine.")


def test_sentence_end_sees_only_the_word_before_a_period() -> None:
    # A period right after a newline ends a sentence; the old lookup read the word on the line before ("Dr").
    assert find_point_end("See Dr\n. Then more. And", max_sentences=1) == len("See Dr\n.")


def test_undecided_tail_holds_a_blank_line_or_a_partial_marker() -> None:
    assert undecided_tail("Keep a routine.\n  **12") == len("Keep a routine.")
    assert undecided_tail("Keep a routine.\n \n") == len("Keep a routine.")
    assert undecided_tail("Keep a routine.\n12a") == len("Keep a routine.\n12a")


def test_format_point_indents_continuation_lines() -> None:
    assert format_point(1, "Why?", "Because.\n\n  More.") == "1. Why? Because.\n\n   More."


# -- StopHoldback -------------------------------------------------------------------------------------------


def feed(cutter: StopHoldback, pieces: list[str]) -> list[str]:
    return [cutter.push(piece) for piece in pieces] + [cutter.flush()]


def test_stop_holdback_cuts_at_a_stop_split_across_pushes() -> None:
    cutter = StopHoldback(["</s>"])
    assert feed(cutter, ["Hello <", "/", "s> never shown"]) == ["Hello ", "", "", ""]
    assert cutter.stopped
    assert cutter.push("more") == ""


def test_stop_holdback_releases_a_tail_that_was_no_stop() -> None:
    cutter = StopHoldback(["\n\nUser:", "###"])
    assert feed(cutter, ["a\n", "\nUs", "ual ##", "x #"]) == ["a", "", "\n\nUsual ", "##x ", "#"]
    assert not cutter.stopped


def test_stop_holdback_the_earliest_stop_wins_and_empty_stops_are_ignored() -> None:
    assert feed(StopHoldback(["", "bc", "abcd"]), ["xab", "cd"]) == ["x", "", ""]
    assert feed(StopHoldback(["abcd", "bx"]), ["xab", "xcd"]) == ["x", "a", ""]
    assert feed(StopHoldback(["", ""]), ["a", "b"]) == ["a", "b", ""]
    assert feed(StopHoldback([]), ["a"]) == ["a", ""]


def test_stop_holdback_a_longer_stop_that_began_earlier_wins_in_any_split() -> None:
    # The whole text cuts at "<a<" (position 0), so the pieces must too, though "a" completes first.
    assert feed(StopHoldback(["a", "<a<"]), ["<a<"]) == ["", ""]
    assert feed(StopHoldback(["a", "<a<"]), ["<a", "<"]) == ["", "", ""]
    assert feed(StopHoldback(["a", "<a<"]), ["<a", "b"]) == ["", "<", ""]
    cutter = StopHoldback(["a", "<a<"])
    assert feed(cutter, ["x<a"]) == ["x", "<"]
    assert cutter.stopped


def test_stop_holdback_holds_the_longest_possible_start() -> None:
    cutter = StopHoldback(["aab"])
    assert feed(cutter, ["xaa", "aab", "c"]) == ["x", "aa", "", ""]


# -- LivePoint ----------------------------------------------------------------------------------------------


def stream(point: str, pieces: list[str], index: int = 2) -> list[str]:
    live = LivePoint(index, point)
    return [live.push(piece) for piece in pieces] + [live.flush()]


def test_live_point_shows_text_as_soon_as_it_is_certain() -> None:
    shown = stream("Eat greens", [" Leafy vegetables help with digestion and", " keep you full.", ""])
    assert shown == ["Leafy vegetables help with digestion and", " keep you full.", "", ""]


def test_live_point_holds_a_possible_echo_then_drops_it() -> None:
    pieces = ["2", ". **Eat", " Greens", "**", " —", " Leafy", " vegetables", "."]
    shown = stream("Eat greens", pieces)
    assert "".join(shown) == "Leafy vegetables."
    assert shown[:5] == ["", "", "", "", ""]
    assert shown[5] == "Leafy"


def test_live_point_holds_trailing_whitespace_and_a_possible_next_point() -> None:
    shown = stream("Sleep", ["Aim for 8 hours. ", "\t", "\n", "3", ".", " Eat", " more"])
    assert shown == ["Aim for 8 hours.", "", "", "", "", "", "", ""]
    shown = stream("Sleep", ["Aim for 8 hours.", "\n", "3", "0 minutes", " of reading."])
    assert "".join(shown) == "Aim for 8 hours.\n30 minutes of reading."
    assert shown[3] == "\n30 minutes"


def test_live_point_joins_a_crlf_split_across_pushes() -> None:
    pieces = ["Line one.\r", "\nLine two.\r", "\r\n", "4) next"]
    assert "".join(stream("Sleep", pieces)) == clean_point_text(2, "Sleep", "".join(pieces)) == "Line one.\nLine two."


def test_live_point_text_is_final_once_the_next_point_starts() -> None:
    live = LivePoint(1, "Sleep")
    assert live.push("Rest.\n2. Eat") == "Rest."
    assert live.done
    assert live.push(" more") == live.flush() == ""


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "2.", "2. Dim the lights", "**Dim the lights**:", "Dim", "dim the lights - Use lamps.\r\n", "\n1. x"],
)
def test_live_point_equals_clean_point_text_for_every_split(raw: str) -> None:
    expected = clean_point_text(2, "Dim the lights", raw)
    for size in (1, 2, 3, 5):
        pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert "".join(stream("Dim the lights", pieces)) == expected
