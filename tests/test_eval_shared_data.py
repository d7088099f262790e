"""Tests that need `../shared`: the named datasets equal its data files, and FastChat's judge prompts load.

Without `../shared` beside the project, this module is skipped as a whole, with one line saying why.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if not (SHARED / "data" / "vicuna80.jsonl").is_file():
    pytest.skip(
        f"{SHARED} is not present: the tests comparing with its data files and judge prompts cannot run",
        allow_module_level=True,
    )

from sot.backends.scripted import ScriptedBackend  # noqa: E402
from sot.eval.dataset import load_dataset  # noqa: E402
from sot.eval.datasets import (  # noqa: E402
    FASTCHAT_VICUNA,
    LIMA_ROUTER,
    VICUNA_ROUTER,
    DatasetSettings,
    load_named,
)
from sot.eval.judge import Judge, JudgeSettings, load_judge_prompts, render_judge_messages, run_judging  # noqa: E402
from sot.eval.records import AnswerRecord, JudgementRecord, load_records  # noqa: E402
from test_datasets import FileServer, no_proxies, serve  # noqa: E402, F401 (no_proxies: an autouse fixture)

VICUNA = SHARED / "data" / "vicuna80.jsonl"
LIMA = SHARED / "data" / "lima_router.jsonl"
FASTCHAT_PROMPTS = SHARED / "reference" / "fastchat_judge_prompts.jsonl"
# Questions whose text in the public data/lima/router.csv lacks the leading or trailing whitespace that
# lima_router.jsonl has (found by comparing a text copy of the public file with this one, offset by offset).
LIMA_RSTRIPPED = {
    *("0002", "0036", "0040", "0044", "0055", "0101", "0157", "0159", "0160", "0166", "0174", "0182"),
    *("0201", "0232", "0234", "0240", "0249", "0252", "0374", "0469", "0505", "0598", "0809", "0843"),
}
LIMA_LSTRIPPED = {"0872"}


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def public_router_csv(records: list[dict[str, Any]]) -> bytes:
    """A `label;request` file in the public files' layout: CSV quoting, CRLF between rows, no final newline."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";")
    writer.writerow(["label", "request"])
    for record in records:
        number, question = record["id"].split("-")[1], record["question"]
        if record["id"].startswith("lima-"):
            question = question.rstrip() if number in LIMA_RSTRIPPED else question
            question = question.lstrip() if number in LIMA_LSTRIPPED else question
        writer.writerow([int(record["sot_suitable"]), question])
    return buffer.getvalue().removesuffix("\r\n").encode()


def public_fastchat_jsonl(records: list[dict[str, Any]]) -> bytes:
    lines = [
        json.dumps({"question_id": int(r["id"].split("-")[1]), "category": r["category"], "turns": [r["question"]]})
        for r in records
    ]
    return "".join(line + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    vicuna = rows(VICUNA)
    return {
        VICUNA_ROUTER.key: public_router_csv(vicuna),
        FASTCHAT_VICUNA.key: public_fastchat_jsonl(vicuna),
        LIMA_ROUTER.key: public_router_csv(rows(LIMA)),
    }


@pytest.fixture
def server() -> Iterator[FileServer]:
    running = FileServer({})
    yield running
    running.close()


def test_vicuna80_loads() -> None:
    questions = load_dataset(VICUNA)
    assert len(questions) == 80
    assert len({q.category for q in questions}) == 9
    assert sum(q.sot_suitable is True for q in questions) == 37


def test_the_pinned_sums_are_those_of_the_sources_rebuilt_from_shared(sources: dict[str, bytes]) -> None:
    """How the pins were derived (offline): not a check against the downloaded files, which none of this is."""
    for source in (VICUNA_ROUTER, FASTCHAT_VICUNA, LIMA_ROUTER):
        assert hashlib.sha256(sources[source.key]).hexdigest() == source.sha256, source.path
    assert len(sources[VICUNA_ROUTER.key].decode()) == 8715  # the public files' lengths in characters
    assert len(sources[LIMA_ROUTER.key].decode()) == 240626
    assert len(sources[FASTCHAT_VICUNA.key].decode()) == 13125


def test_the_named_datasets_equal_the_shared_files_record_for_record(
    tmp_path: Path, server: FileServer, sources: dict[str, bytes]
) -> None:
    serve(sources, server)
    settings = DatasetSettings(
        cache_dir=tmp_path, base_urls={"sot": f"{server.url}/sot/", "fastchat": f"{server.url}/fastchat/"}
    )  # the pinned sums, not overridden
    assert load_named("vicuna80", settings=settings) == load_dataset(VICUNA)
    assert (tmp_path / "vicuna80.jsonl").read_bytes() == VICUNA.read_bytes()
    assert load_named("lima", settings=settings) == load_dataset(LIMA)
    assert len(server.requests) == 3
    # Only surrounding whitespace differs, which the dataset loader strips.
    joined, shared = rows(tmp_path / "lima.jsonl"), rows(LIMA)
    assert [r["question"].strip() for r in joined] == [r["question"].strip() for r in shared]
    assert sum(a != b for a, b in zip(joined, shared, strict=True)) == len(LIMA_RSTRIPPED) + len(LIMA_LSTRIPPED)


async def test_fastchat_prompts_by_category_and_braces_stay_literal(tmp_path: Path) -> None:
    from test_eval_pipeline import answered

    prompts = load_judge_prompts(FASTCHAT_PROMPTS)
    assert set(prompts.prompts) == {"general", "coding", "math"}
    assert prompts.prompts["math"].score_position == "end"  # it asks for a Python tuple at the end
    assert prompts.prompts["general"].score_position == "first_line"
    assert prompts.for_category("roleplay").name == "general"

    messages = render_judge_messages(prompts.prompts["coding"], "Count {answer_2} in {x}", "A {prompt}", "B")
    assert messages[0].role == "system" and "precise assistant" in messages[0].content
    user = messages[1].content
    assert "Count {answer_2} in {x}" in user and "A {prompt}" in user  # substituted once, literally
    assert "evaluate the coding abilities" in user

    results = await answered(tmp_path, ["normal", "sot"])
    backend = ScriptedBackend(
        lambda r: "I solved it myself ... so (7, 3)" if "tuple" in r.messages[-1].content else "6 6"
    )
    judge = Judge(backend, prompts, JudgeSettings(max_tokens=16, long_max_tokens=300))
    await run_judging(judge, load_records(results, AnswerRecord), tmp_path / "j.jsonl")
    records = {r.question_id: r for r in load_records(tmp_path / "j.jsonl", JudgementRecord)}
    assert records["c1"].prompt == "fastchat_judge_prompts.jsonl/coding"
    assert records["m1"].prompt == "fastchat_judge_prompts.jsonl/math"
    assert records["m1"].orders[0].scores == (7.0, 3.0) and records["m1"].verdict == "tie"  # 7>3 then 7>3: disagree
    assert records["g1"].verdict == "tie"
    budgets = {r.sampling.max_tokens for r in backend.requests}
    assert budgets == {16, 300}
    assert {r.prefill for r in backend.requests} == {""}  # FastChat's prompts are used as published
