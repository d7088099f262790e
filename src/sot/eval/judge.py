"""`sot eval judge`'s engine: an LLM judge compares candidate answers (SoT, SoT-R) with normal answers.

FastChat-style pairwise scoring: the judge sees the question and two answers and writes two scores, 1-10.
Each pair is judged in both orders and the two verdicts are combined (`sot.eval.metrics.combine_orders`:
a win or a loss only when both orders agree) to cancel position bias. Prompts come in sets keyed by judge
category (`general`, `coding`, `math`, as FastChat's); the package's own set is the default, and FastChat's
file (`fastchat_judge_prompts.jsonl`, passed by path) is the reproducible option. LLMZoo's five metrics
(relevance, diversity, coherence, immersion, integrity) are optional extra criteria, asked in the same
score-line format so the judge can stop after a few tokens.

Replies are parsed, never guessed: a reply without a readable score pair is recorded as `unparsable`, with
the judge's raw text. Prompts are filled by literal placeholder substitution, because questions and
answers contain braces. This module computes no aggregate numbers (see `metrics` and `report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from sot.backends.base import Backend, GenerationRequest, Message, SamplingParams
from sot.core.prompts import fill
from sot.errors import ConfigError, SoTError
from sot.eval.dataset import json_objects
from sot.eval.metrics import Verdict, combine_orders, order_verdict
from sot.eval.records import AnswerRecord, JudgementRecord, OrderJudgement, RecordFile, RecordWriter, load_records
from sot.events import Mode

ScorePosition = Literal["first_line", "end"]
OVERALL = "overall"
LLMZOO_METRICS: tuple[str, ...] = ("relevance", "diversity", "coherence", "immersion", "integrity")
CANDIDATES: tuple[Mode, ...] = ("sot", "auto")


class JudgePrompt(BaseModel):
    """One judge prompt: `template` holds {question}, {answer_1}, {answer_2} and {prompt} (the instruction)."""

    model_config = ConfigDict(frozen=True)

    name: str
    system: str | None = None
    template: str
    prompt: str
    # Where the judge is asked to put the scores: the first line, or a "(a, b)" tuple at the end (FastChat's
    # math prompt), which needs a longer generation.
    score_position: ScorePosition = "first_line"
    # The start of the judge's reply, for backends that continue one: it pins small models to the score
    # line. Only the continuation is parsed (the prefill is ours, not the judge's words).
    prefill: str = ""


class JudgePromptSet(BaseModel):
    """Judge prompts by judge category; a question's category picks one, `general` being the fallback."""

    model_config = ConfigDict(frozen=True)

    name: str
    prompts: dict[str, JudgePrompt]

    def for_category(self, category: str) -> JudgePrompt:
        # FastChat's convention: coding and math questions get their own prompt, everything else `general`.
        if category in self.prompts:
            return self.prompts[category]
        if "general" in self.prompts:
            return self.prompts["general"]
        return next(iter(self.prompts.values()))


# -- the package's own prompts ---------------------------------------------------------------------------

_SYSTEM = "You are a fair and careful judge of answer quality."
_TEMPLATE = (
    "Question:\n{question}\n\n"
    "[Answer of Assistant 1]\n{answer_1}\n[End of Assistant 1's answer]\n\n"
    "[Answer of Assistant 2]\n{answer_2}\n[End of Assistant 2's answer]\n\n"
    "{prompt}"
)
_SCORE_LINE = (
    "Give each assistant a score from 1 (useless) to 10 (excellent). On the first line write only the two "
    "scores, Assistant 1's first, separated by a space (for example: 6 8). Then explain briefly on the next "
    "lines. The order in which the answers are shown must not affect your scores, and a longer answer is not "
    "better just for being longer."
)
_OWN_INSTRUCTIONS = {
    "general": "Compare the two answers to the question above: how helpful, relevant, accurate and detailed is each?",
    "coding": (
        "The assistants were asked to write code. Compare their answers: does the code solve the problem "
        "correctly, is it efficient, and is it clear and explained?"
    ),
    "math": (
        "Compare the two answers to the math question above. Check each step and the final result: a wrong "
        "result is a serious fault, whatever the style."
    ),
}
# Chosen on SmolLM2-135M: without a prefill it answers the question itself instead of scoring; a bare
# "Scores:" gets bullet lists. FastChat's prompts are used as published, without one.
_SCORE_PREFILL = "Assistant 1 score, Assistant 2 score:"
DEFAULT_PROMPTS = JudgePromptSet(
    name="sot-default",
    prompts={
        category: JudgePrompt(
            name=category,
            system=_SYSTEM,
            template=_TEMPLATE,
            prompt=f"{text} {_SCORE_LINE}",
            prefill=_SCORE_PREFILL,
        )
        for category, text in _OWN_INSTRUCTIONS.items()
    },
)

# LLMZoo's metric definitions, in our words, asked in the score-line format.
_LLMZOO_DEFINITIONS = {
    "relevance": (
        "Relevance: an answer should stay close to the question and answer it accurately, with enough detail "
        "and without repetition or padding."
    ),
    "diversity": (
        "Diversity: an answer should be comprehensive and cover a range of information and perspectives "
        "rather than a single one."
    ),
    "coherence": (
        "Coherence: an answer should flow logically from one point to the next and be easy to follow, "
        "without gaps or contradictions."
    ),
    "immersion": (
        "Immersion: when the question assigns a role, an answer should stay in character, with the tone, "
        "manner and words of that role; an assistant-like tone is worse."
    ),
    "integrity": (
        "Integrity: an answer should be ethical and sound, avoiding stereotypes, offensive language, "
        "misleading information and harmful suggestions."
    ),
}
LLMZOO_PROMPTS: dict[str, JudgePrompt] = {
    metric: JudgePrompt(
        name=metric,
        system=_SYSTEM,
        template=_TEMPLATE,
        prompt=f"{definition}\nRate only the {metric} of the two answers to the question above. {_SCORE_LINE}",
        prefill=_SCORE_PREFILL,
    )
    for metric, definition in _LLMZOO_DEFINITIONS.items()
}


# -- prompt files ----------------------------------------------------------------------------------------


def parse_fastchat_prompts(lines: Sequence[str], name: str, source: str = "<judge prompts>") -> JudgePromptSet:
    """FastChat's judge-prompt JSONL: `category`, `system_prompt`, `prompt_template`, `defaults.prompt`.

    An optional `prefill` field (ours, not FastChat's) starts the judge's reply on backends that can continue one.
    """
    prompts: dict[str, JudgePrompt] = {}
    for _, where, row in json_objects(lines, source, ConfigError):
        category, template = row.get("category"), row.get("prompt_template")
        defaults = row.get("defaults") or {}
        instruction = defaults.get("prompt", "") if isinstance(defaults, dict) else None
        system = row.get("system_prompt")
        if not isinstance(category, str) or not category:
            raise ConfigError(f"{where}: 'category' must be a non-empty string")
        if not isinstance(template, str) or "{answer_1}" not in template or "{answer_2}" not in template:
            raise ConfigError(f"{where}: 'prompt_template' must contain {{answer_1}} and {{answer_2}}")
        if not isinstance(instruction, str) or (system is not None and not isinstance(system, str)):
            raise ConfigError(f"{where}: 'defaults.prompt' and 'system_prompt' must be strings")
        prefill = row.get("prefill", "")  # our extension: the start of the judge's reply
        if not isinstance(prefill, str):
            raise ConfigError(f"{where}: 'prefill' must be a string")
        if category in prompts:
            raise ConfigError(f"{where}: a second prompt for category {category!r}")
        # FastChat's math prompt asks for "a Python tuple" after the judge's own solution, not a first line.
        position: ScorePosition = "end" if "tuple" in instruction.lower() else "first_line"
        prompts[category] = JudgePrompt(
            name=category,
            system=system,
            template=template,
            prompt=instruction,
            score_position=position,
            prefill=prefill,
        )
    if not prompts:
        raise ConfigError(f"{source}: no judge prompts")
    return JudgePromptSet(name=name, prompts=prompts)


def load_judge_prompts(source: str | os.PathLike[str] | None) -> JudgePromptSet:
    """The built-in set (`None` or "default"), or a FastChat-format JSONL file."""
    if source is None or str(source) == "default":
        return DEFAULT_PROMPTS
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--judge-prompts: cannot read {path} ({exc.strerror or exc})") from None
    return parse_fastchat_prompts(text.splitlines(), name=path.name, source=str(path))


# -- rendering and parsing -------------------------------------------------------------------------------


def render_judge_messages(prompt: JudgePrompt, question: str, answer_1: str, answer_2: str) -> list[Message]:
    """The judge's conversation; placeholders are substituted literally, once."""
    user = fill(prompt.template, question=question, answer_1=answer_1, answer_2=answer_2, prompt=prompt.prompt)
    messages = [Message("system", prompt.system)] if prompt.system else []
    messages.append(Message("user", user))
    return messages


_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"
_TUPLE = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
_FULL_NUMBER = re.compile(rf"{_NUMBER}")
MAX_SCORE = 10.0


def _score(token: str) -> float | None:
    if not _FULL_NUMBER.fullmatch(token):
        return None
    value = float(token)
    return value if 0.0 <= value <= MAX_SCORE else None


def parse_scores(reply: str, position: ScorePosition = "first_line") -> tuple[float, float] | None:
    """The (Assistant 1, Assistant 2) scores of a judge reply, or None when they are not plainly there.

    `first_line`: the first non-empty line must hold exactly two numbers in [0, 10], separated by spaces or a
    comma, optionally in brackets or bold. `end`: the last "(a, b)" tuple of the reply (the first line as a
    fallback). Anything else is unparsable: labels, fractions, words, a single number.

    >>> parse_scores("8 6\\nAssistant 1 was better."), parse_scores("**7, 7.5**"), parse_scores("Score: 8")
    ((8.0, 6.0), (7.0, 7.5), None)
    >>> parse_scores("Solving it... so the scores are (3, 9).", "end")
    (3.0, 9.0)
    """
    if position == "end":
        tuples = _TUPLE.findall(reply)
        if tuples:
            a, b = (_score(t) for t in tuples[-1])
            return (a, b) if a is not None and b is not None else None
    first = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    first = first.strip("*`_ ").strip()
    if first[:1] in "([" and first[-1:] in ")]":
        first = first[1:-1]
    tokens = first.replace(",", " ").split()
    if len(tokens) != 2:
        return None
    a, b = _score(tokens[0]), _score(tokens[1])
    return (a, b) if a is not None and b is not None else None


# -- judging ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSettings:
    """Judge sampling: greedy, and only as long as the score format needs."""

    max_tokens: int = 16  # a first-line score pair fits easily; the explanation is not needed
    long_max_tokens: int = 512  # for prompts that put the scores at the end (FastChat's math prompt)
    temperature: float = 0.0
    seed: int | None = None

    def sampling(self, prompt: JudgePrompt, base: SamplingParams | None = None) -> SamplingParams:
        budget = self.long_max_tokens if prompt.score_position == "end" else self.max_tokens
        base = base or SamplingParams()
        return SamplingParams(
            max_tokens=budget,
            temperature=self.temperature,
            top_p=base.top_p if self.temperature else 1.0,
            repeat_penalty=base.repeat_penalty,
            frequency_penalty=base.frequency_penalty,
            seed=self.seed,
        )


class Judge:
    """An LLM judge on any backend, with a prompt set and the LLMZoo metric prompts."""

    def __init__(
        self,
        backend: Backend,
        prompts: JudgePromptSet = DEFAULT_PROMPTS,
        settings: JudgeSettings | None = None,
    ) -> None:
        self.backend = backend
        self.prompts = prompts
        self.settings = settings or JudgeSettings()

    def prompt_for(self, criterion: str, category: str) -> tuple[str, JudgePrompt]:
        """(prompt id for the record, prompt) judging `criterion` for a question of `category`."""
        if criterion == OVERALL:
            prompt = self.prompts.for_category(category)
            return f"{self.prompts.name}/{prompt.name}", prompt
        if criterion in LLMZOO_PROMPTS:
            return f"llmzoo/{criterion}", LLMZOO_PROMPTS[criterion]
        raise ConfigError(f"unknown criterion {criterion!r}; use {OVERALL} or one of {', '.join(LLMZOO_METRICS)}")

    def prefill(self, prompt: JudgePrompt) -> str:
        return prompt.prefill if self.backend.supports_prefill else ""

    async def ask(self, prompt: JudgePrompt, question: str, answer_1: str, answer_2: str) -> tuple[str, str, float]:
        """One judge call: (reply, finish reason, seconds)."""
        request = GenerationRequest(
            messages=tuple(render_judge_messages(prompt, question, answer_1, answer_2)),
            sampling=self.settings.sampling(prompt, getattr(self.backend, "default_sampling", None)),
            prefill=self.prefill(prompt),
        )
        started = time.perf_counter()
        parts: list[str] = []
        finish = "stop"
        async with contextlib.aclosing(self.backend.stream(request)) as stream:
            async for chunk in stream:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        return "".join(parts), finish, time.perf_counter() - started

    async def judge_pair(
        self, prompt: JudgePrompt, question: str, candidate: str, baseline: str
    ) -> tuple[list[OrderJudgement], Verdict]:
        """Both orders (concurrently), each order's verdict for the candidate, and the combined verdict."""
        first, second = await asyncio.gather(
            self.ask(prompt, question, candidate, baseline),
            self.ask(prompt, question, baseline, candidate),
        )
        orders: list[OrderJudgement] = []
        for (reply, finish, seconds), candidate_first in ((first, True), (second, False)):
            scores = parse_scores(reply, prompt.score_position)
            orders.append(
                OrderJudgement(
                    order="candidate_first" if candidate_first else "baseline_first",
                    reply=reply,
                    scores=scores,
                    verdict=order_verdict(scores, candidate_first=candidate_first),
                    prefill=self.prefill(prompt),
                    finish_reason=finish,
                    seconds=seconds,
                )
            )
        return orders, combine_orders(orders[0].verdict, orders[1].verdict)


@dataclass
class JudgeSummary:
    """What a judging run did."""

    planned: int = 0
    already_done: int = 0
    judged: int = 0
    unparsable: int = 0
    identical: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (question id, candidate) without both answers
    failed: list[JudgementRecord] = field(default_factory=list)
    seconds: float = 0.0

    def failure_lines(self, limit: int = 20) -> list[str]:
        groups: dict[str, list[JudgementRecord]] = {}
        for record in self.failed:
            groups.setdefault(record.error_kind or "error", []).append(record)
        lines = []
        for kind, records in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            keys = ", ".join(f"{r.question_id}/{r.candidate}/{r.criterion}" for r in records[:5])
            more = f" and {len(records) - 5} more" if len(records) > 5 else ""
            lines.append(f"{kind} x{len(records)} ({keys}{more}): {records[0].error}")
        return lines[:limit]


@dataclass(frozen=True)
class _Pair:
    candidate: AnswerRecord
    baseline: AnswerRecord
    criterion: str


def pairs_to_judge(
    answers: RecordFile[AnswerRecord], candidates: Sequence[Mode], criteria: Sequence[str]
) -> tuple[list[_Pair], list[tuple[str, str]]]:
    """Every (candidate answer, normal answer, criterion) with both answers present, and the keys missing one."""
    ok = {record.key: record for record in answers.ok}
    question_ids = list(dict.fromkeys(record.question_id for record in answers))
    pairs: list[_Pair] = []
    missing: list[tuple[str, str]] = []
    present_candidates = {record.mode for record in answers}
    for qid in question_ids:
        baseline = ok.get((qid, "normal"))
        for mode in candidates:
            if mode not in present_candidates:
                continue  # this run never answered in that mode: nothing is missing
            candidate = ok.get((qid, mode))
            if baseline is None or candidate is None:
                missing.append((qid, mode))
                continue
            pairs.extend(_Pair(candidate, baseline, criterion) for criterion in criteria)
    return pairs, missing


async def run_judging(
    judge: Judge,
    answers: RecordFile[AnswerRecord],
    output: str | os.PathLike[str],
    *,
    candidates: Sequence[Mode] = CANDIDATES,
    criteria: Sequence[str] = (OVERALL,),
    concurrency: int = 2,
    on_plan: Callable[[int, int], None] | None = None,
    on_record: Callable[[JudgementRecord], None] | None = None,
) -> JudgeSummary:
    """Judge every pair the judgements file at `output` lacks; append one record per pair as it completes."""
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    for criterion in criteria:
        judge.prompt_for(criterion, "general")  # unknown criteria fail before any work
    path = Path(output)
    existing = load_records(path, JudgementRecord, missing_ok=True)
    identity = (judge.backend.name, judge.backend.model, judge.prompts.name)
    earlier = next(iter(existing.ok), None)
    if earlier is not None and (earlier.judge_backend, earlier.judge_model, earlier.prompt_set) != identity:
        raise ConfigError(
            f"{path} holds judgements by {earlier.judge_backend}/{earlier.judge_model} with prompts "
            f"{earlier.prompt_set!r}; judge with the same judge or write to another --output"
        )
    done = {key for key, record in existing.records.items() if record.ok}
    pairs, missing = pairs_to_judge(answers, candidates, criteria)
    todo = [p for p in pairs if (p.candidate.question_id, p.candidate.mode, p.criterion) not in done]
    summary = JudgeSummary(planned=len(pairs), already_done=len(pairs) - len(todo), missing=missing)
    if on_plan is not None:
        on_plan(len(pairs), summary.already_done)
    started = time.perf_counter()
    limit = asyncio.Semaphore(concurrency)
    with RecordWriter(path) as writer:

        async def one(pair: _Pair) -> None:
            async with limit:
                record = await _judge_one(judge, pair)
            writer.write(record)
            if record.ok:
                summary.judged += 1
                summary.unparsable += record.verdict == "unparsable"
                summary.identical += record.identical
            else:
                summary.failed.append(record)
            if on_record is not None:
                on_record(record)

        async with asyncio.TaskGroup() as group:
            for pair in todo:
                group.create_task(one(pair))
    summary.seconds = time.perf_counter() - started
    return summary


async def _judge_one(judge: Judge, pair: _Pair) -> JudgementRecord:
    candidate, baseline = pair.candidate, pair.baseline
    candidate_result, baseline_result = candidate.answered(), baseline.answered()
    prompt_id, prompt = judge.prompt_for(pair.criterion, candidate.category)
    base: dict[str, Any] = {
        "question_id": candidate.question_id,
        "category": candidate.category,
        "candidate": candidate.mode,
        "baseline": baseline.mode,
        "candidate_mode_used": candidate_result.mode_used,
        "criterion": pair.criterion,
        "prompt": prompt_id,
        "judge_backend": judge.backend.name,
        "judge_model": judge.backend.model,
        "prompt_set": judge.prompts.name,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    candidate_text, baseline_text = candidate_result.answer.strip(), baseline_result.answer.strip()
    if candidate_text == baseline_text:
        # The same text cannot win or lose against itself (SoT-R routed to normal decoding, greedy).
        return JudgementRecord(**base, verdict="tie", identical=True)
    try:
        orders, verdict = await judge.judge_pair(prompt, candidate.question, candidate_text, baseline_text)
    except SoTError as exc:
        return JudgementRecord(**base, error=str(exc) or type(exc).__name__, error_kind=type(exc).__name__)
    return JudgementRecord(**base, orders=orders, verdict=verdict)
