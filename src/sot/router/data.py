"""Labelled routing examples: load them from JSONL files or directories, single questions or conversations.

One JSON object a line. A single question has `question`; a conversation has `messages` (a list of
`{"role", "content"}`, ending with a user turn). The label is `label` (this project's data) or
`sot_suitable` (the shared LIMA and Vicuna files): does a skeleton of independent points suit the reply
to the last user turn, in context? `kind` (or `category`) and `reason` are optional. Unlabelled lines are
skipped. The project's own examples ship in `sot/router/data/` (see its README).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sot.backends.base import Message
from sot.eval.dataset import DatasetError, json_objects

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One labelled conversation; `question` is its last user turn."""

    id: str
    messages: tuple[Message, ...]
    label: bool
    kind: str = ""
    reason: str = ""
    source: str = ""

    @property
    def question(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")

    @property
    def multi_turn(self) -> bool:
        return len(self.messages) > 1


def own_data_dir() -> Path:
    """The directory of this project's own labelled examples, shipped with the package."""
    return Path(str(resources.files("sot.router").joinpath("data")))


def dataset_files(path: Path) -> list[Path]:
    """`path` itself, or the `*.jsonl` files of a directory in name order."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DatasetError(f"{path}: no .jsonl files in this directory")
        return files
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or directory")
    return [path]


def _messages(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    if "messages" in row:
        raw = row["messages"]
        if not isinstance(raw, list) or not raw:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for turn in raw:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise DatasetError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
            out.append(Message(role=turn["role"], content=turn["content"]))
        if out[-1].role != "user":
            raise DatasetError(f"{where}: a conversation must end with a user turn")
        return tuple(out)
    text = row.get("question")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: needs a non-empty 'question' or a 'messages' list")
    return (Message(role="user", content=text.strip()),)


def parse_examples(lines: Iterable[str], source: str) -> list[Example]:
    """Labelled examples from JSONL lines; `DatasetError` names the source and line of a bad one."""
    examples = []
    for number, where, row in json_objects(lines, source):
        label = row.get("label", row.get("sot_suitable"))
        if label is None:
            continue
        if not isinstance(label, bool):
            raise DatasetError(f"{where}: the label must be true or false")
        kind = row.get("kind", row.get("category", ""))
        examples.append(
            Example(
                id=str(row.get("id", f"{Path(source).stem}-{number}")),
                messages=_messages(row, where),
                label=label,
                kind=str(kind or ""),
                reason=str(row.get("reason", "")),
                source=source,
            )
        )
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """Every labelled example of a JSONL file, or of all `*.jsonl` files of a directory."""
    examples: list[Example] = []
    for file in dataset_files(Path(path)):
        with file.open(encoding="utf-8") as fh:
            examples.extend(parse_examples(fh, str(file)))
    return examples


def digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the data files of `paths` (directories expanded, in order): what a model was trained on."""
    h = hashlib.sha256()
    for path in paths:
        for file in dataset_files(Path(path)):
            h.update(file.read_bytes())
    return h.hexdigest()
