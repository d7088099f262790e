"""The JSONL files an evaluation writes (answers, judgements): record schemas, appending, reading back.

Files are append-only logs: a record is written and flushed as soon as it exists, so an interrupted run
loses at most the answers in flight. Reading tolerates a torn last line (the process died mid-write) and
resolves repeated keys: a successful record beats a failed one, and a later record beats an earlier one of
the same standing. Nothing here runs a model or computes a metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from sot.errors import InputError
from sot.eval.metrics import Verdict
from sot.events import Mode, Result

JudgeOrder = Literal["candidate_first", "baseline_first"]


class MissingResultError(InputError):
    """A failed answer record (it has no result) was used where an answer is needed."""


class AnswerRecord(BaseModel):
    """One question answered in one mode, or the failure to answer it (`error` set, `result` None)."""

    kind: Literal["answer"] = "answer"
    question_id: str
    category: str
    sot_suitable: bool | None = None
    question: str
    mode: Mode
    result: Result | None = None
    # Wall time the runner measured around the engine call; `result.stats.total_seconds` is the engine's own.
    wall_seconds: float | None = None
    error: str | None = None
    error_kind: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    # The machine's 1-minute load average when the answer started: other work on the box skews latency.
    load_average: float | None = None
    recorded_at: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.question_id, self.mode)

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    def answered(self) -> Result:
        """The answer's result; `MissingResultError` for a failed answer, which has none."""
        if self.result is None:
            raise MissingResultError(f"{self.question_id}/{self.mode} has no result ({self.error or 'failed'})")
        return self.result

    @property
    def seconds(self) -> float:
        """Latency of the answer as the engine measured it (includes routing in `auto` mode)."""
        return self.answered().stats.total_seconds


class OrderJudgement(BaseModel):
    """The judge's reply for one presentation order of a pair."""

    order: JudgeOrder
    prefill: str = ""  # the start of the reply we supplied (backends that continue a reply), not parsed
    reply: str = ""  # the judge's own words
    # As the judge wrote them: (Assistant 1, Assistant 2); None when the reply could not be parsed.
    scores: tuple[float, float] | None = None
    verdict: Verdict = "unparsable"  # from the candidate's point of view
    finish_reason: str | None = None
    seconds: float = 0.0


class JudgementRecord(BaseModel):
    """A candidate answer (SoT or SoT-R) judged against the normal answer on one criterion, both orders."""

    kind: Literal["judgement"] = "judgement"
    question_id: str
    category: str
    candidate: Mode  # "sot" or "auto"
    baseline: Mode = "normal"
    candidate_mode_used: str | None = None
    criterion: str  # "overall" or an LLMZoo metric
    prompt: str  # which judge prompt: "<set>/<category>" or "<set>/<metric>"
    judge_backend: str
    judge_model: str
    prompt_set: str
    orders: list[OrderJudgement] = Field(default_factory=list)
    verdict: Verdict | None = None  # None only when `error` is set
    identical: bool = False  # the two answers were the same text: a tie without asking the judge
    error: str | None = None
    error_kind: str | None = None
    recorded_at: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.question_id, self.candidate, self.criterion)

    @property
    def ok(self) -> bool:
        return self.error is None and self.verdict is not None


R = TypeVar("R", AnswerRecord, JudgementRecord)


@dataclass
class RecordFile(Generic[R]):
    """The records of one file, resolved to one per key, plus what could not be read."""

    path: Path
    records: dict[Any, R] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)
    lines: int = 0

    def __iter__(self) -> Iterator[R]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ok(self) -> list[R]:
        return [r for r in self.records.values() if r.ok]

    @property
    def failed(self) -> list[R]:
        return [r for r in self.records.values() if not r.ok]


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield number, None
                continue
            yield number, row if isinstance(row, dict) else None


def load_records(path: str | os.PathLike[str], model: type[R], *, missing_ok: bool = False) -> RecordFile[R]:
    """Read a results or judgements file; unreadable lines are counted in `bad_lines`, not fatal."""
    file = Path(path)
    out: RecordFile[R] = RecordFile(path=file)
    if not file.exists():
        if missing_ok:
            return out
        raise InputError(f"{file}: no such file")
    kind = model.model_fields["kind"].default
    for number, row in _read_rows(file):
        out.lines += 1
        if row is None:
            out.bad_lines.append(number)
            continue
        if row.get("kind") != kind:
            raise InputError(f"{file}:{number}: a {row.get('kind')!r} record where {kind!r} records were expected")
        try:
            record = model.model_validate(row)
        except ValidationError as exc:
            raise InputError(f"{file}:{number}: not a valid {kind} record ({exc.error_count()} error(s))") from None
        previous = out.records.get(record.key)
        # A success is final; a failure only replaces another failure (a retry that failed again).
        if previous is None or record.ok or not previous.ok:
            out.records[record.key] = record
    return out


class RecordWriter:
    """Appends records to a JSONL file, one flushed line each (so a kill loses nothing already finished)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A torn last line (killed mid-write) must not swallow the next record: start on a fresh line.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                needs_newline = existing.read(1) != b"\n"
        self._handle = self.path.open("a", encoding="utf-8")
        if needs_newline:
            self._handle.write("\n")
        self.written = 0

    def write(self, record: BaseModel) -> None:
        self._handle.write(record.model_dump_json() + "\n")
        self._handle.flush()
        self.written += 1

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_records(path: str | os.PathLike[str], records: Iterable[BaseModel]) -> None:
    """Append many records (tests and tools that build files by hand)."""
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
