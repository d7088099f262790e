"""The evaluation pipeline on the scripted backend: datasets, resumable runs, judging, reports and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from sot.backends.base import GenerationRequest
from sot.backends.scripted import ScriptedBackend, default_responder
from sot.cli.eval_cmd import eval_group, parse_criteria
from sot.engine import Engine, EngineConfig
from sot.errors import BackendConnectionError, ConfigError
from sot.eval.dataset import DatasetError, Question, load_dataset, parse_dataset, question_id, select
from sot.eval.judge import (
    DEFAULT_PROMPTS,
    LLMZOO_METRICS,
    Judge,
    load_judge_prompts,
    run_judging,
)
from sot.eval.records import AnswerRecord, JudgementRecord, load_records
from sot.eval.report import summarize, write_report
from sot.eval.runner import parse_modes, run_answers
from sot.events import Mode, Result

QUESTIONS = [
    Question("g1", "How can I improve my time management skills?", "generic", True),
    Question("g2", "What are the most effective ways to deal with stress?", "generic", True),
    Question("c1", "Write a C++ program to count lines in a {file}.", "coding", False),
    Question("m1", "Solve for x in the equation 3x + 10 = 5(x - 2).", "math", False),
]
# A few more for the command line: three categories, two questions each.
MORE = [
    Question("g3", "What are the benefits of reading every day?", "generic", True),
    Question("c2", "Implement binary search in Python.", "coding", False),
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small dataset file (the command line reads a file; named datasets are tested in test_datasets.py)."""
    path = tmp_path / "data" / "questions.jsonl"
    path.parent.mkdir()
    rows = [
        {"id": q.id, "category": q.category, "question": q.question, "sot_suitable": q.sot_suitable}
        for q in [*QUESTIONS, *MORE]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def varied_responder(request: GenerationRequest) -> str:
    """Default answers, but a normal answer's length depends on the question (so speed-ups differ)."""
    text = default_responder(request)
    if text.startswith("A plain answer"):
        return text + " More words." * (len(request.messages[-1].content) % 7)
    return text


def engine(responder: Callable[[GenerationRequest], str] = varied_responder, **kwargs: Any) -> Engine:
    return Engine(ScriptedBackend(responder, **kwargs))


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- datasets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"question": "a"}\n{"question": "b"\n', r"<t>:2: not valid JSON"),
        ('{"question": "a"}\n\n["question"]\n', r"<t>:3: each line must be a JSON object"),
        ('{"id": "x", "question": ""}\n', r"<t>:1: 'question' must be a non-empty string"),
        (
            '{"id": "x", "question": "a"}\n{"id": "x", "question": "b"}\n',
            r"<t>:2: duplicate id 'x' \(first on line 1\)",
        ),
        ('{"question": "a", "sot_suitable": "yes"}\n', r"<t>:1: 'sot_suitable' must be true, false or null"),
        ('{"question": "a", "category": 3}\n', r"<t>:1: 'category' must be a non-empty string"),
        ('{"question": "a", "id": true}\n', r"<t>:1: 'id' must be"),
        ("\n\n", r"<t>: no questions"),
    ],
)
def test_dataset_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        parse_dataset(text.splitlines(), source="<t>")


def test_dataset_defaults_and_selection(tmp_path: Path, dataset: Path) -> None:
    questions = parse_dataset(['{"question": " Why? "}', '{"id": 7, "question": "How?", "category": "x"}'])
    assert questions[0] == Question(question_id("Why?"), "Why?", "uncategorized", None)
    assert questions[1].id == "7" and questions[1].category == "x"
    assert question_id("Why?") == question_id("Why?")  # stable across runs: resume finds it again
    questions = load_dataset(dataset)
    assert [q.id for q in select(questions, per_category=1, limit=3)] == ["g1", "c1", "m1"]
    assert {q.category for q in select(questions, categories=["math"])} == {"math"}
    assert [q.id for q in select(questions, ids=["c2", "g1"])] == ["g1", "c2"]  # dataset order
    assert [q.id for q in select(questions, suitable_only=True)] == ["g1", "g2", "g3"]
    with pytest.raises(DatasetError, match="unknown question id"):
        select(questions, ids=["nope"])
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_dataset(tmp_path / "missing.jsonl")


def test_parse_modes() -> None:
    assert parse_modes("normal, sot,auto,sot") == ["normal", "sot", "auto"]
    with pytest.raises(ConfigError, match="unknown mode 'fast'"):
        parse_modes("normal,fast")


# -- runs ----------------------------------------------------------------------------------------------


async def test_run_writes_one_record_per_answer_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "r.results.jsonl"
    seen_lines: list[int] = []

    def on_record(record: AnswerRecord) -> None:
        seen_lines.append(len(out.read_text().splitlines()))  # flushed as soon as it completes

    summary = await run_answers(engine(), QUESTIONS, ["normal", "sot"], out, concurrency=2, on_record=on_record)
    assert summary.planned == 8 and summary.answered == 8 and not summary.failed
    assert seen_lines == list(range(1, 9))
    rows = lines_of(out)
    assert {(r["question_id"], r["mode"]) for r in rows} == {(q.id, m) for q in QUESTIONS for m in ("normal", "sot")}
    sot = next(r for r in rows if r["mode"] == "sot")
    assert sot["result"]["points"] == ["First idea", "Second idea", "Third idea"]
    assert sot["result"]["stats"]["skeleton_seconds"] is not None
    assert len(sot["result"]["stats"]["points"]) == 3
    assert sot["category"] and sot["settings"]["backend"] == "scripted" and sot["settings"]["concurrency"] == 2

    # Resume: nothing left to do for these modes; a new mode only adds its own answers.
    again = await run_answers(engine(), QUESTIONS, ["normal", "sot"], out)
    assert again.already_done == 8 and again.answered == 0
    more = await run_answers(engine(), QUESTIONS, ["normal", "sot", "auto"], out)
    assert more.already_done == 8 and more.answered == 4
    assert len(lines_of(out)) == 12


async def test_failures_are_recorded_summarized_and_retried(tmp_path: Path) -> None:
    out = tmp_path / "r.results.jsonl"

    def flaky(request: GenerationRequest) -> str:
        if "stress" in request.messages[-1].content:
            raise BackendConnectionError("connection refused", backend="scripted")
        return varied_responder(request)

    summary = await run_answers(engine(flaky), QUESTIONS, ["normal"], out)
    assert summary.answered == 3 and len(summary.failed) == 1
    failed = summary.failed[0]
    assert failed.key == ("g2", "normal") and failed.error_kind == "BackendConnectionError"
    assert "connection refused" in summary.failure_lines()[0]
    assert [r["error"] for r in lines_of(out) if r["question_id"] == "g2"] == ["connection refused"]

    retry = await run_answers(engine(), QUESTIONS, ["normal"], out)
    assert retry.already_done == 3 and retry.answered == 1
    records = load_records(out, AnswerRecord)
    assert len(records) == 4 and not records.failed  # the success supersedes the earlier failure


async def test_answer_timeout_is_a_recorded_failure(tmp_path: Path) -> None:
    out = tmp_path / "r.results.jsonl"
    summary = await run_answers(
        engine(token_delay=0.05), QUESTIONS[:1], ["normal"], out, answer_timeout=0.1, warmup=False
    )
    assert len(summary.failed) == 1 and summary.failed[0].error_kind == "AnswerTimeout"


async def test_torn_last_line_is_skipped_and_not_glued_to_the_next_record(tmp_path: Path) -> None:
    out = tmp_path / "r.results.jsonl"
    await run_answers(engine(), QUESTIONS[:2], ["normal"], out)
    with out.open("a") as handle:
        handle.write('{"kind": "answer", "question_id": "c1", "mo')  # killed mid-write
    summary = await run_answers(engine(), QUESTIONS[:3], ["normal"], out)
    assert summary.answered == 1
    records = load_records(out, AnswerRecord)
    assert records.bad_lines == [3] and len(records) == 3


async def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r.results.jsonl"
    await run_answers(engine(), QUESTIONS[:1], ["normal"], out)
    other = Engine(ScriptedBackend(varied_responder), EngineConfig(point_max_tokens=7))
    with pytest.raises(ConfigError, match="different settings \\(point_max_tokens\\)"):
        await run_answers(other, QUESTIONS, ["normal"], out)
    # Concurrency may change between a run and its resumption.
    await run_answers(engine(), QUESTIONS, ["normal"], out, concurrency=3)
    # SoT-R answers may be added later with a router; then the router is fixed for the file.
    routed = Engine(ScriptedBackend(varied_responder), router=KeywordRouter())
    await run_answers(routed, QUESTIONS, ["normal", "auto"], out)
    with pytest.raises(ConfigError, match="different settings \\(router\\)"):
        await run_answers(engine(), QUESTIONS, ["normal", "auto"], out)


async def test_concurrency_is_bounded_across_questions(tmp_path: Path) -> None:
    class Counting(Engine):
        active = 0
        peak = 0

        async def run(self, conversation: Any, mode: Mode = "sot") -> Result:
            Counting.active += 1
            Counting.peak = max(Counting.peak, Counting.active)
            try:
                return await super().run(conversation, mode)
            finally:
                Counting.active -= 1

    eng = Counting(ScriptedBackend(varied_responder, token_delay=0.002))
    questions = [Question(f"q{i}", f"Question number {i}?") for i in range(12)]
    await run_answers(eng, questions, ["normal", "sot"], tmp_path / "r.jsonl", concurrency=3)
    assert Counting.peak == 3


# -- judging -------------------------------------------------------------------------------------------


def answers_in(request: GenerationRequest) -> tuple[str, str]:
    """Assistant 1's and Assistant 2's answers as the default judge template shows them."""
    text = request.messages[-1].content
    one = re.search(r"\[Answer of Assistant 1\]\n(.*?)\n\[End of Assistant 1", text, re.S)
    two = re.search(r"\[Answer of Assistant 2\]\n(.*?)\n\[End of Assistant 2", text, re.S)
    assert one and two
    return one.group(1), two.group(1)


def prefers_longer(request: GenerationRequest) -> str:
    a, b = answers_in(request)
    return f"{8 if len(a) > len(b) else 4} {8 if len(b) > len(a) else 4}\nThe longer one is better."


class KeywordRouter:
    """Sends code and math to normal decoding, everything else to SoT."""

    name = "keyword"

    async def decide(self, messages: Any) -> Any:
        text = messages[-1].content
        use_sot = not any(word in text for word in ("program", "Solve"))
        return SimpleNamespace(use_sot=use_sot, router=self.name, reason="keywords", score=None)


async def answered(tmp_path: Path, modes: list[Mode] | None = None) -> Path:
    out = tmp_path / "r.results.jsonl"
    routed = Engine(ScriptedBackend(varied_responder), router=KeywordRouter())
    await run_answers(routed, QUESTIONS, modes or ["normal", "sot", "auto"], out)
    return out


async def test_judging_both_orders_and_identical_answers(tmp_path: Path) -> None:
    results = await answered(tmp_path)
    judge_backend = ScriptedBackend(prefers_longer)
    out = tmp_path / "r.judgements.jsonl"
    summary = await run_judging(Judge(judge_backend), load_records(results, AnswerRecord), out)
    # 4 questions x (sot, auto). The router sent c1 and m1 to normal decoding: the same text as the normal
    # answer, a tie without asking the judge.
    assert summary.planned == 8 and summary.judged == 8 and summary.identical == 2
    assert len(judge_backend.requests) == 12  # 6 different pairs x 2 orders
    records = load_records(out, JudgementRecord)
    sot = [r for r in records if r.candidate == "sot"]
    assert all(r.verdict == "win" for r in sot)  # SoT answers are longer than the scripted normal ones
    for r in sot:
        assert [o.order for o in r.orders] == ["candidate_first", "baseline_first"]
        assert r.orders[0].scores == (8.0, 4.0) and r.orders[1].scores == (4.0, 8.0)
        assert r.orders[0].reply.startswith("8 4")
        kind = r.category if r.category in ("coding", "math") else "general"
        assert r.prompt == f"sot-default/{kind}"
    auto = {r.question_id: r for r in records if r.candidate == "auto"}
    assert all(auto[q].identical and auto[q].verdict == "tie" and not auto[q].orders for q in ("c1", "m1"))
    assert auto["g1"].verdict == "win" and auto["g1"].candidate_mode_used == "sot"
    # Greedy and short: the score line is all that is asked for, and the reply is started for the judge.
    assert {r.sampling.max_tokens for r in judge_backend.requests} == {16}
    assert {r.sampling.temperature for r in judge_backend.requests} == {0.0}
    assert {r.prefill for r in judge_backend.requests} == {"Assistant 1 score, Assistant 2 score:"}
    assert sot[0].orders[0].prefill == "Assistant 1 score, Assistant 2 score:"


async def test_no_prefill_for_backends_that_cannot_continue_a_reply(tmp_path: Path) -> None:
    results = await answered(tmp_path, ["normal", "sot"])
    chat_judge = ScriptedBackend(prefers_longer, supports_prefill=False)
    await run_judging(Judge(chat_judge), load_records(results, AnswerRecord), tmp_path / "j.jsonl")
    assert {r.prefill for r in chat_judge.requests} == {""}
    assert "On the first line write only the two scores" in chat_judge.requests[0].messages[-1].content


async def test_position_bias_cancels_and_unparsable_is_recorded_not_guessed(tmp_path: Path) -> None:
    results = await answered(tmp_path, ["normal", "sot"])
    answers = load_records(results, AnswerRecord)

    biased = await run_judging(Judge(ScriptedBackend(lambda r: "9 5")), answers, tmp_path / "biased.jsonl")
    assert biased.judged == 4
    assert {r.verdict for r in load_records(tmp_path / "biased.jsonl", JudgementRecord)} == {"tie"}

    def rambles(request: GenerationRequest) -> str:
        a, _ = answers_in(request)
        return "7 7" if a.startswith("1.") else "Assistant 2 is clearly better."

    garbled = await run_judging(Judge(ScriptedBackend(rambles)), answers, tmp_path / "garbled.jsonl")
    assert garbled.unparsable == 4
    record = next(iter(load_records(tmp_path / "garbled.jsonl", JudgementRecord)))
    assert record.verdict == "unparsable"
    assert record.orders[0].verdict == "tie" and record.orders[1].verdict == "unparsable"
    assert record.orders[1].scores is None and record.orders[1].reply == "Assistant 2 is clearly better."


async def test_judge_failures_are_retried_and_judge_must_not_change(tmp_path: Path) -> None:
    results = await answered(tmp_path, ["normal", "sot"])
    answers = load_records(results, AnswerRecord)
    out = tmp_path / "j.jsonl"

    def down(request: GenerationRequest) -> str:
        raise BackendConnectionError("judge unreachable")

    first = await run_judging(Judge(ScriptedBackend(down)), answers, out)
    assert len(first.failed) == 4 and first.failed[0].error_kind == "BackendConnectionError"
    second = await run_judging(Judge(ScriptedBackend(prefers_longer)), answers, out)
    assert second.judged == 4 and second.already_done == 0
    third = await run_judging(Judge(ScriptedBackend(prefers_longer)), answers, out)
    assert third.already_done == 4 and third.judged == 0
    other = Judge(ScriptedBackend(prefers_longer, model="another-judge"))
    with pytest.raises(ConfigError, match="holds judgements by scripted/scripted"):
        await run_judging(other, answers, out)


async def test_llmzoo_criteria(tmp_path: Path) -> None:
    results = await answered(tmp_path, ["normal", "sot"])
    backend = ScriptedBackend(prefers_longer)
    criteria = parse_criteria("all")
    assert criteria == ["overall", *LLMZOO_METRICS]
    await run_judging(
        Judge(backend), load_records(results, AnswerRecord), tmp_path / "j.jsonl", criteria=criteria, concurrency=4
    )
    records = load_records(tmp_path / "j.jsonl", JudgementRecord)
    assert len(records) == 4 * 6
    assert {r.prompt for r in records if r.criterion == "immersion"} == {"llmzoo/immersion"}
    assert any("Immersion:" in r.messages[-1].content for r in backend.requests)
    with pytest.raises(ConfigError, match="unknown criterion"):
        parse_criteria("overall,fluency")


def test_default_prompts_cover_fastchat_categories() -> None:
    assert set(DEFAULT_PROMPTS.prompts) == {"general", "coding", "math"}
    for prompt in DEFAULT_PROMPTS.prompts.values():
        assert prompt.score_position == "first_line"
        assert all(p in prompt.template for p in ("{question}", "{answer_1}", "{answer_2}", "{prompt}"))


# -- reports -------------------------------------------------------------------------------------------


async def test_report_files_and_numbers(tmp_path: Path) -> None:
    results = await answered(tmp_path)
    judgements = tmp_path / "r.judgements.jsonl"
    await run_judging(Judge(ScriptedBackend(prefers_longer)), load_records(results, AnswerRecord), judgements)
    files = write_report(results, tmp_path / "report", judgements=judgements, title="Test report")
    names = {p.name for p in files.charts}
    assert names == {
        "speedup_by_category.png",
        "latency_distribution.png",
        "win_tie_lose.png",
        "net_win_rate.png",
        "router.png",
    }
    for chart in files.charts:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(files.summary.read_text())
    again = summarize(load_records(results, AnswerRecord), load_records(judgements, JudgementRecord))
    assert summary["speedup"] == again["speedup"] and summary["quality"] == again["quality"]
    assert summary["quality"]["overall"]["sot"]["overall"]["net_win_rate"] == 1.0
    assert summary["router"]["routers"] == ["keyword"] and summary["auto_without_router"] == 0
    assert summary["router"]["overall"]["accuracy"] == 1.0  # the keyword router matches these labels
    markdown = files.markdown.read_text()
    assert markdown.startswith("# Test report")
    for heading in ("## Headline", "## Speed-up by category", "## Judged quality", "## Failures and flags"):
        assert heading in markdown
    assert "(speedup_by_category.png)" in markdown
    assert "## Router decisions vs labels" in markdown


# -- the command line ----------------------------------------------------------------------------------


def test_cli_run_judge_report(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SOT_BACKEND", raising=False)
    runner = CliRunner()
    common = ["--backend", "scripted"]
    result = runner.invoke(
        eval_group, ["run", str(dataset), "--modes", "normal,sot", "--per-category", "1", "-j", "2", *common]
    )
    assert result.exit_code == 0, result.output
    results = tmp_path / "questions.results.jsonl"
    assert len(lines_of(results)) == 6
    assert "6 answered, 0 failed" in result.output

    result = runner.invoke(eval_group, ["run", str(dataset), "--modes", "normal,sot", "--per-category", "1", *common])
    assert result.exit_code == 0 and "resuming: 6 of 6" in result.output

    result = runner.invoke(eval_group, ["judge", str(results), *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "questions.judgements.jsonl").exists()

    result = runner.invoke(eval_group, ["report", str(results), "--note", "Reproduce: sot eval run ..."])
    assert result.exit_code == 0, result.output
    assert "SoT speed-up" in result.output
    report = tmp_path / "questions-report"
    assert "\nReproduce: sot eval run ...\n" in (report / "report.md").read_text()
    assert (report / "summary.json").exists()
    assert json.loads((report / "summary.json").read_text())["judgements_file"].endswith("questions.judgements.jsonl")


def test_cli_errors_are_one_line(tmp_path: Path, dataset: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{"question": 3}\n')
    runner = CliRunner()
    result = runner.invoke(eval_group, ["run", str(bad), "--backend", "scripted", "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1
    assert "bad.jsonl:2: 'question' must be a non-empty string" in result.output
    result = runner.invoke(eval_group, ["run", str(dataset), "--backend", "scripted", "--modes", "turbo"])
    assert result.exit_code == 2 and "unknown mode 'turbo'" in result.output


def test_cli_run_reports_failures_with_exit_code(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(request: GenerationRequest) -> str:
        if "stress" in request.messages[-1].content:
            raise BackendConnectionError("connection refused")
        return default_responder(request)

    import sot.cli.eval_cmd as cmd

    monkeypatch.setattr(cmd, "build_backend", lambda params, progress=None: ScriptedBackend(refused))
    result = CliRunner().invoke(
        eval_group,
        ["run", str(dataset), "--ids", "g1,g2", "-o", str(tmp_path / "r.jsonl"), "--backend", "scripted"],
    )
    assert result.exit_code == 1
    assert "2 answer(s) failed" in result.output
    assert "BackendConnectionError x2 (g2/normal, g2/sot): connection refused" in result.output


def test_event_loop_is_not_left_running() -> None:
    # The commands use asyncio.run; nothing here should leave a loop behind for other tests.
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_cli_auto_mode_uses_the_named_router(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "r.results.jsonl"
    args = ["run", str(dataset), "--ids", "g1,c1", "--modes", "normal,auto", "--router", "heuristic"]
    result = CliRunner().invoke(eval_group, [*args, "-o", str(out), "--backend", "scripted"])
    assert result.exit_code == 0, result.output
    routes = {r["question_id"]: r["result"]["route"] for r in lines_of(out) if r["mode"] == "auto"}
    assert {route["router"] for route in routes.values()} == {"heuristic"}
    assert all(r["settings"]["router"] == "heuristic" for r in lines_of(out))
    summary = summarize(load_records(out, AnswerRecord))
    assert summary["router"]["routers"] == ["heuristic"] and summary["router"]["overall"]["labelled"] == 2


def test_custom_judge_prompt_files(tmp_path: Path) -> None:
    good = tmp_path / "mine.jsonl"
    row = {
        "category": "general",
        "system_prompt": "Judge.",
        "prompt_template": "Q: {question}\nA1: {answer_1}\nA2: {answer_2}\n{prompt}",
        "defaults": {"prompt": "Two scores, first line."},
        "prefill": "Scores:",
    }
    good.write_text(json.dumps(row) + "\n")
    prompts = load_judge_prompts(good)
    assert prompts.name == "mine.jsonl" and prompts.for_category("coding").prefill == "Scores:"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt_template": "no answers here"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: 'prompt_template' must contain"):
        load_judge_prompts(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_judge_prompts(tmp_path / "missing.jsonl")


def test_cli_against_an_openai_compatible_endpoint(upstream: str, tmp_path: Path, dataset: Path) -> None:
    """The same three commands through the real `openai` client and a real local server process."""
    endpoint = ["--backend", "openai", "--base-url", upstream, "--model", "test-model", "--api-key", "test"]
    results = tmp_path / "api.results.jsonl"
    runner = CliRunner()
    args = ["run", str(dataset), "--ids", "g1,g2,c1", "--modes", "normal,sot", "-j", "3"]
    outcome = runner.invoke(eval_group, [*args, "-o", str(results), *endpoint])
    assert outcome.exit_code == 0, outcome.output
    answers = lines_of(results)
    assert len(answers) == 6 and {r["result"]["backend"] for r in answers} == {"openai"}
    assert all(r["result"]["mode_used"] == "sot" for r in answers if r["mode"] == "sot")

    outcome = runner.invoke(eval_group, ["judge", str(results), *endpoint])
    assert outcome.exit_code == 0, outcome.output
    judgements = lines_of(tmp_path / "api.judgements.jsonl")
    # The test server writes prose, not scores: every pair is recorded as unparsable, with the raw replies.
    assert len(judgements) == 3 and {j["verdict"] for j in judgements} == {"unparsable"}
    assert all(o["reply"] and o["scores"] is None for j in judgements for o in j["orders"])

    outcome = runner.invoke(eval_group, ["report", str(results)])
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads((tmp_path / "api-report" / "summary.json").read_text())
    assert summary["backend"] == "openai" and summary["quality"]["overall"]["sot"]["overall"]["unparsable"] == 3


def test_cli_run_defaults_to_the_named_vicuna80(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_datasets import seed_cache, synthetic_sources

    cache = tmp_path / "cache"
    for name, value in seed_cache(cache, synthetic_sources()).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SOT_DATASETS_DIR", str(cache))
    for repo in ("SOT", "FASTCHAT"):
        monkeypatch.setenv(f"SOT_DATASETS_{repo}_URL", "http://127.0.0.1:9/")  # nothing listens: cache only
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(eval_group, ["run", "--backend", "scripted", "--modes", "normal"])
    assert result.exit_code == 0, result.output
    answers = lines_of(tmp_path / "vicuna80.results.jsonl")
    assert [r["question_id"] for r in answers] == ["vicuna-01", "vicuna-02", "vicuna-03"]
