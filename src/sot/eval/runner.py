"""`sot eval run`'s engine: answer every question in every mode, appending one record per answer, resumably.

A record's key is (question id, mode). Keys that already have a successful record in the results file are
skipped, so an interrupted run resumes where it stopped; failed answers are recorded with an `error` field
(so they are summarized) and are retried by the next run. Questions run concurrently under a bound, all on
one shared engine. This module does not judge answers or compute metrics, and draws nothing on screen (the
CLI passes callbacks for its progress bar).

Latency honesty: every answer in flight shares the machine (and, for the embedded model, the batch). With
the local backend keep `concurrency` at 1-2, or per-question timings measure contention, not SoT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from sot.backends.base import GenerationRequest, Message
from sot.engine import Engine
from sot.errors import ConfigError, InputError, SoTError
from sot.eval.dataset import Question
from sot.eval.records import AnswerRecord, RecordFile, RecordWriter, load_records
from sot.events import Mode

MODES: tuple[Mode, ...] = get_args(Mode)
# Settings that may differ between a run and its resumption without making the answers incomparable.
_RESUMABLE_DIFFERENCES = frozenset({"concurrency", "answer_timeout", "cpu_count", "router"})


def parse_modes(text: str | Sequence[str]) -> list[Mode]:
    """`"normal,sot,auto"` -> the modes, in order, without repeats.

    >>> parse_modes("sot, normal,sot")
    ['sot', 'normal']
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    modes: list[Mode] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in MODES:
            raise ConfigError(f"unknown mode {item!r}; choose from {', '.join(MODES)}")
        if item not in modes:
            modes.append(item)
    if not modes:
        raise ConfigError("no modes given")
    return modes


def engine_settings(engine: Engine, *, concurrency: int, answer_timeout: float | None = None) -> dict[str, Any]:
    """What a record needs to say about how it was produced (and what must match when resuming)."""
    config = engine.config
    return {
        "backend": engine.backend.name,
        "model": engine.backend.model,
        "sampling": dataclasses.asdict(config.sampling),
        "prompts": engine.prompts.name,
        "use_prefill": engine.use_prefill,
        "max_points": config.max_points,
        "min_points": config.min_points,
        "skeleton_max_tokens": config.skeleton_max_tokens,
        "point_max_tokens": config.point_max_tokens,
        "max_parallel": config.max_parallel,
        "point_deadline": config.point_deadline,
        "router": getattr(engine.router, "name", None),
        "concurrency": concurrency,
        "answer_timeout": answer_timeout,
        "cpu_count": os.cpu_count(),
    }


def settings_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ in a way that would make old and new answers incomparable."""
    keys = (set(old) | set(new)) - _RESUMABLE_DIFFERENCES
    return sorted(k for k in keys if old.get(k) != new.get(k))


@dataclass
class RunSummary:
    """What a run did; `failed` holds the failure records of this run (retried by the next one)."""

    planned: int = 0
    already_done: int = 0
    answered: int = 0
    failed: list[AnswerRecord] = field(default_factory=list)
    truncated: int = 0
    fallbacks: int = 0
    seconds: float = 0.0

    @property
    def attempted(self) -> int:
        return self.answered + len(self.failed)

    def failure_lines(self, limit: int = 20) -> list[str]:
        """Failures grouped by kind, each with up to a few example keys and the first message."""
        groups: dict[str, list[AnswerRecord]] = {}
        for record in self.failed:
            groups.setdefault(record.error_kind or "error", []).append(record)
        lines: list[str] = []
        for kind, records in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            keys = ", ".join(f"{r.question_id}/{r.mode}" for r in records[:5])
            more = f" and {len(records) - 5} more" if len(records) > 5 else ""
            lines.append(f"{kind} x{len(records)} ({keys}{more}): {records[0].error}")
        return lines[:limit]


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


async def warm_up(engine: Engine) -> None:
    """Load the model (and the router) before the clock matters: the first answer must not pay for it."""
    request = GenerationRequest(
        messages=(Message("user", "Say hi."),),
        sampling=dataclasses.replace(engine.config.sampling, max_tokens=1),
    )
    async with contextlib.aclosing(engine.backend.stream(request)) as stream:
        async for _ in stream:
            pass
    if engine.router is not None:
        await engine.router.decide([Message("user", "How can I improve my time management skills?")])


def plan(questions: Sequence[Question], modes: Sequence[Mode]) -> list[tuple[Question, Mode]]:
    """Jobs in question-major order, so one question's modes run close together in time (same conditions)."""
    return [(q, m) for q in questions for m in modes]


def check_resumable(existing: RecordFile[AnswerRecord], settings: dict[str, Any], modes: Sequence[Mode]) -> None:
    """Raise `ConfigError` when the results file holds answers made with settings that differ from these."""
    earlier = next(iter(existing.ok), None)  # the file is checked on every resume, so one record speaks for all
    conflicts = settings_conflicts(earlier.settings, settings) if earlier is not None else []
    # The router only shapes `auto` answers: a run may add them later, but with one router only.
    earlier_auto = next((r for r in existing.ok if r.mode == "auto"), None)
    if "auto" in modes and earlier_auto is not None and earlier_auto.settings.get("router") != settings["router"]:
        conflicts.append("router")
    if conflicts:
        raise ConfigError(
            f"{existing.path} holds answers made with different settings ({', '.join(conflicts)}); "
            "resume with the same options or write to another --output"
        )


async def run_answers(
    engine: Engine,
    questions: Sequence[Question],
    modes: Sequence[Mode],
    output: str | os.PathLike[str],
    *,
    concurrency: int = 1,
    answer_timeout: float | None = None,
    warmup: bool = True,
    on_plan: Callable[[int, int], None] | None = None,
    on_record: Callable[[AnswerRecord], None] | None = None,
) -> RunSummary:
    """Answer what the results file at `output` does not hold yet; append a record per answer as it completes.

    `on_plan(total, already_done)` is called once before work starts; `on_record` after each record is
    written. Raises `ConfigError` when the file holds answers produced with different settings.
    """
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    path = Path(output)
    settings = engine_settings(engine, concurrency=concurrency, answer_timeout=answer_timeout)
    existing = load_records(path, AnswerRecord, missing_ok=True)
    check_resumable(existing, settings, modes)
    done = {key for key, record in existing.records.items() if record.ok}
    jobs = plan(questions, modes)
    todo = [(q, m) for q, m in jobs if (q.id, m) not in done]
    summary = RunSummary(planned=len(jobs), already_done=len(jobs) - len(todo))
    if on_plan is not None:
        on_plan(len(jobs), summary.already_done)
    if not todo:
        return summary
    if warmup:
        await warm_up(engine)

    started = time.perf_counter()
    limit = asyncio.Semaphore(concurrency)
    with RecordWriter(path) as writer:

        async def answer(question: Question, mode: Mode) -> None:
            async with limit:
                record = await _answer_one(engine, question, mode, settings, answer_timeout)
            writer.write(record)  # synchronous: records never interleave, and each is flushed at once
            if record.ok and record.result is not None:
                summary.answered += 1
                summary.truncated += not record.result.complete
                summary.fallbacks += record.result.fallback_reason is not None
            else:
                summary.failed.append(record)
            if on_record is not None:
                on_record(record)

        async with asyncio.TaskGroup() as group:
            for question, mode in todo:
                group.create_task(answer(question, mode))
    summary.seconds = time.perf_counter() - started
    return summary


async def _answer_one(
    engine: Engine,
    question: Question,
    mode: Mode,
    settings: dict[str, Any],
    answer_timeout: float | None,
) -> AnswerRecord:
    base: dict[str, Any] = {
        "question_id": question.id,
        "category": question.category,
        "sot_suitable": question.sot_suitable,
        "question": question.question,
        "mode": mode,
        "settings": settings,
        "load_average": _load_average(),
    }
    started = time.perf_counter()
    try:
        async with asyncio.timeout(answer_timeout):
            result = await engine.run(question.question, mode)
    except TimeoutError:
        return AnswerRecord(
            **base,
            wall_seconds=time.perf_counter() - started,
            error=f"no answer within the {answer_timeout:g} s answer timeout",
            error_kind="AnswerTimeout",
            recorded_at=_now(),
        )
    except (SoTError, InputError) as exc:
        # Recorded, summarized and retried on resume. Anything else is a bug and stops the run.
        return AnswerRecord(
            **base,
            wall_seconds=time.perf_counter() - started,
            error=str(exc) or type(exc).__name__,
            error_kind=type(exc).__name__,
            recorded_at=_now(),
        )
    return AnswerRecord(**base, result=result, wall_seconds=time.perf_counter() - started, recorded_at=_now())
