"""The test upstream replays real answers' lengths (`sot.testing.replay`), and `sot bench --replay` uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sot.errors import InputError
from sot.eval.records import AnswerRecord, write_records
from sot.events import PointStats, Result, Stats
from sot.testing.replay import AnswerShape, ReplayBook, point_index
from sot.testing.upstream_answers import Msg, plan_answer
from sot.testing.upstream_options import UpstreamOptions
from test_bench import bench

QUESTIONS = {
    "q1": ("How can I sleep better at night?", 150, (30, 45, 20), 26),
    "q2": ("What makes a good code review?", 90, (12, 18, 25, 10), 30),
}


def record(qid: str, mode: str, *, failed: bool = False) -> AnswerRecord:
    question, normal_tokens, points, skeleton = QUESTIONS[qid]
    base = {"question_id": qid, "category": "generic", "question": question, "mode": mode, "sot_suitable": True}
    if failed:
        return AnswerRecord(**base, error="boom", error_kind="X")
    if mode == "normal":
        stats = Stats(total_seconds=3.0, completion_tokens=normal_tokens)
    else:
        point_stats = [
            PointStats(index=i, point=f"p{i}", start=0.5, seconds=1.0, tokens=t, finish_reason="stop", attempts=1)
            for i, t in enumerate(points, start=1)
        ]
        stats = Stats(total_seconds=1.5, completion_tokens=skeleton + sum(points), points=point_stats)
    result = Result(
        mode_requested=mode,  # type: ignore[arg-type]
        mode_used=mode,  # type: ignore[arg-type]
        answer="text",
        complete=True,
        finish_reason="stop",
        backend="local",
        model="m",
        stats=stats,
    )
    return AnswerRecord(**base, result=result)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    path = tmp_path / "real.results.jsonl"
    # A failed answer has no shape; it is skipped.
    records = [record(q, m) for q in QUESTIONS for m in ("normal", "sot")]
    write_records(path, [*records, record("q1", "sot", failed=True)])
    return path


def test_the_shapes_of_a_results_file(results: Path) -> None:
    book = ReplayBook.load(results)
    assert book.shapes[0] == AnswerShape("q1", "generic", QUESTIONS["q1"][0], True, 150, 26, (30, 45, 20))
    assert [q["id"] for q in book.questions()] == ["q1", "q2"] and book.questions(limit=1)[0]["id"] == "q1"
    assert book.shapes[0].skeleton_words() == [8, 8, 7]  # 3 numbers + 23 words = 26 tokens
    assert book.shapes[0].point(2) == 45 and book.shapes[0].point(9) == 30  # an unknown point: the median


def test_a_file_without_pairs_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_records(path, [record("q1", "normal"), record("q2", "sot")])
    with pytest.raises(InputError, match="no question with both a normal and a SoT answer"):
        ReplayBook.load(path)


def test_the_upstream_answers_with_the_replayed_lengths(results: Path) -> None:
    options = UpstreamOptions(replay=ReplayBook.load(results))
    question = QUESTIONS["q1"][0]
    system = Msg("system", "First you write only a skeleton of the answer.")
    skeleton = plan_answer([system, Msg("user", f"Question: {question}\nWrite only the skeleton.")], options)
    assert skeleton.kind == "skeleton" and len(skeleton.tokens) == 26
    lines = "".join(skeleton.tokens).splitlines()
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3"]
    expand = [system, Msg("user", f"Question: {question}"), Msg("assistant", "\n".join(lines))]
    point = plan_answer([*expand, Msg("user", 'Now expand point 2, "x", in 1-2 sentences.')], options)
    assert point.kind == "point" and len(point.tokens) == 45
    assert len(plan_answer([Msg("user", question)], options).tokens) == 150
    # The latest user message holding a known question decides: few-shot examples before it do not.
    examples = [Msg("user", "Question: What are typical dishes?"), Msg("assistant", "1. Dumplings\n2. Noodles")]
    assert len(plan_answer([*examples, Msg("user", QUESTIONS["q2"][0])], options).tokens) == 90
    # An unknown question gets the usual lengths.
    other = plan_answer([Msg("user", "Why is the sky blue?")], options)
    assert len(other.tokens) == round(options.tokens_per_answer * options.full_answer_factor)
    assert len(plan_answer([Msg("user", question)], options, tokens=7).tokens) == 7  # `tokens` still wins


def test_which_point_a_request_expands() -> None:
    assert point_index([Msg("user", "Expand point #4 now.")]) == 4
    assert point_index([Msg("user", "Go on."), Msg("assistant", "1. a\n3. Use caching:")]) == 3
    assert point_index([Msg("user", "Write more.")]) is None


def test_sot_bench_replays_each_question(tmp_path: Path, results: Path) -> None:
    pacing = ["--upstream-ttft", "0.05", "--upstream-tokens-per-second", "400"]
    payload, stdout = bench(["--replay", str(results), *pacing], tmp_path, {})
    rows = {row["id"]: row for row in payload["rows"]}
    assert set(rows) == {"q1", "q2"}
    for qid, (_, normal_tokens, points, skeleton) in QUESTIONS.items():
        assert rows[qid]["normal_tokens"] == normal_tokens
        assert rows[qid]["points"] == len(points)
        assert rows[qid]["sot_tokens"] == pytest.approx(skeleton + sum(points), rel=0.1)
    # Different answers, different times: the replay is question by question.
    assert rows["q1"]["normal_seconds"] > rows["q2"]["normal_seconds"] * 1.3
    settings = payload["settings"]
    assert settings["upstream"]["replay"] == str(results) and settings["upstream"]["tokens_per_second"] == 400
    assert json.loads(json.dumps(payload["summary"]))["runs"] == 2 and "replaying" in stdout
