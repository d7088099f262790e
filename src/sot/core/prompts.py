"""Prompt templates for both SoT stages, as data: built-in sets per model family, or parsed from a file.

A `PromptSet` says how to ask for a skeleton and how to ask for one point's expansion. Placeholders are
`{question}`, `{skeleton}`, `{index}` and `{point}`; they are substituted literally, so user text full of
braces is safe. Two styles share one set:
- prefill style, for backends that continue a started assistant reply (the paper's "role switch"):
  the reply is started with `skeleton_prefill` ("1.") or `point_prefill` ("3. <point>:");
- instruction style, for plain chat APIs: `skeleton_instruction` / `point_instruction` are appended to
  the user's turn and ask the model to start its reply that way itself.
The point stage's prompts are laid out so that every point of a question starts with the same bytes
(shared instructions, question, skeleton) and only the last turn differs: prefix caches then serve all
points. The paper's own prompt files (`outline_prompt` / `point_prompt` with `[ROLESWITCHING assistant:]`)
parse into the same structure. This module does no I/O: callers read files and pass the text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from sot.backends.base import Message
from sot.errors import ConfigError

ROLE_SWITCH = "[ROLESWITCHING assistant:]"


class PromptSet(BaseModel):
    """Everything needed to render both stages' prompts for one model family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    system: str | None = None
    skeleton_examples: tuple[tuple[str, str], ...] = ()
    skeleton_user: str
    skeleton_prefill: str = "1."
    skeleton_instruction: str = ' Start your reply with "1." and write nothing but the list.'
    point_layout: Literal["conversation", "standalone"] = "conversation"
    point_user: str
    point_prefill: str = "{index}. {point}:"
    point_instruction: str = ' Start your reply with "{index}. {point}:" and write only this point.'
    # Where the point prompt asks for "1-2 sentences", the engine can hold a model to it: it ends a point
    # after this many sentences (None: only at a blank line or where the next point starts).
    point_max_sentences: int | None = None
    # When SoT gives up after part of the answer was sent, normal decoding continues that text. A backend that
    # continues a reply gets it as a prefill; any other gets it as its own reply, then this request.
    continue_user: str = (
        "Your answer above was cut off. Continue it exactly where it stopped, without repeating anything."
    )


def fill(template: str, **values: str | int) -> str:
    """Substitute `{name}` placeholders literally; other braces are left alone.

    >>> fill("Q: {question} {x}", question="a {b}")
    'Q: a {b} {x}'
    """
    # Substitute in one pass so a value that itself contains "{point}" is never expanded again.
    out: list[str] = []
    i = 0
    while i < len(template):
        if template[i] == "{":
            end = template.find("}", i)
            key = template[i + 1 : end] if end != -1 else ""
            if key in values:
                out.append(str(values[key]))
                i = end + 1
                continue
        out.append(template[i])
        i += 1
    return "".join(out)


def render_skeleton(points: Sequence[str]) -> str:
    """The skeleton as it is shown back to the model: one numbered line per point."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points, start=1))


def skeleton_request(
    prompts: PromptSet, conversation: Sequence[Message], *, prefill: bool
) -> tuple[list[Message], str]:
    """Messages and assistant prefill for the skeleton stage.

    Order matters for prefix caching: the fixed part (system, few-shot turns) comes first, then the
    conversation's earlier turns, then the question wrapped in the skeleton instructions.
    """
    *history, last = conversation
    messages: list[Message] = []
    if prompts.system:
        messages.append(Message("system", prompts.system))
    for question, skeleton in prompts.skeleton_examples:
        messages.append(Message("user", fill(prompts.skeleton_user, question=question)))
        messages.append(Message("assistant", skeleton))
    messages.extend(history)
    user = fill(prompts.skeleton_user, question=last.content)
    if not prefill:
        user += fill(prompts.skeleton_instruction, question=last.content)
    messages.append(Message("user", user))
    return messages, (prompts.skeleton_prefill if prefill else "")


def point_request(
    prompts: PromptSet,
    conversation: Sequence[Message],
    points: Sequence[str],
    index: int,
    *,
    prefill: bool,
) -> tuple[list[Message], str]:
    """Messages and assistant prefill to expand point `index` (1-based) of `points`."""
    question = conversation[-1].content
    skeleton = render_skeleton(points)
    point = points[index - 1]
    values: dict[str, str | int] = {
        "question": question,
        "skeleton": skeleton,
        "index": index,
        "point": point,
    }
    user = fill(prompts.point_user, **values)
    if not prefill:
        user += fill(prompts.point_instruction, **values)
    if prompts.point_layout == "conversation":
        messages, _ = skeleton_request(prompts, conversation, prefill=prefill)
        # The skeleton is shown as the assistant's own earlier reply, so this prefix is exactly the
        # skeleton stage's context: a forking backend reuses it, an API's prefix cache serves it.
        messages.append(Message("assistant", skeleton))
    else:
        messages = [Message("system", prompts.system)] if prompts.system else []
        messages.extend(conversation[:-1])
    messages.append(Message("user", user))
    return messages, (fill(prompts.point_prefill, **values) if prefill else "")


def continuation_request(
    prompts: PromptSet, conversation: Sequence[Message], answer_so_far: str, *, prefill: bool
) -> tuple[list[Message], str]:
    """Messages and prefill for a normal answer that continues `answer_so_far` (empty: a fresh answer)."""
    messages = list(conversation)
    if not answer_so_far or prefill:
        return messages, answer_so_far
    messages.append(Message("assistant", answer_so_far))
    messages.append(Message("user", prompts.continue_user))
    return messages, ""


def _from_paper_format(data: dict[str, Any], name: str) -> PromptSet:
    """Convert the reference implementation's prompt file into a `PromptSet` (standalone layout)."""

    def rename(template: str) -> str:
        # The paper calls the point's number {point} and its text {point_outline}.
        return (
            template.replace("{point_outline}", "\x00POINT\x00")
            .replace("{point}", "{index}")
            .replace("\x00POINT\x00", "{point}")
            .replace("{request}", "{question}")
            .replace("{outline}", "{skeleton}")
        )

    def split(template: str) -> tuple[str, str]:
        user, _, prefill = template.partition(ROLE_SWITCH)
        return rename(user.rstrip()), rename(prefill.strip())

    try:
        skeleton_user, skeleton_prefill = split(data["outline_prompt"])
        point_user, point_prefill = split(data["point_prompt"])
    except (KeyError, AttributeError) as exc:
        raise ConfigError(f"prompt file {name!r}: needs string fields outline_prompt and point_prompt") from exc
    return PromptSet(
        name=name,
        description="The Skeleton-of-Thought paper's prompts (reference implementation).",
        skeleton_user=skeleton_user,
        skeleton_prefill=skeleton_prefill or "1.",
        point_layout="standalone",
        point_user=point_user,
        point_prefill=point_prefill or "{index}. {point}",
    )


def parse_prompt_set(text: str, *, name: str = "custom") -> PromptSet:
    """Parse a prompt file's text: either this project's format (`PromptSet` fields) or the paper's."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"prompt file {name!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"prompt file {name!r} must hold a JSON object")
    if "outline_prompt" in data:
        return _from_paper_format(data, name)
    data.setdefault("name", name)
    try:
        return PromptSet.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"prompt file {name!r} is not a valid prompt set:\n{exc}") from exc


# The built-in sets. "smollm" was tuned on the embedded SmolLM2-135M-Instruct (see tests/test_e2e_local.py):
# a 2-shot multi-turn skeleton prompt gives clean 3-8 point lists, and the point is prefilled with a colon
# (without it the model often writes the next number straight away, leaving the point empty).
_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "What are the typical types of Chinese dishes?",
        "1. Dumplings\n2. Noodles\n3. Dim sum\n4. Hot pot\n5. Fried rice",
    ),
    (
        "What are some practical tips for individuals to reduce their carbon emissions?",
        "1. Save energy at home\n2. Use public transport\n3. Eat less meat\n4. Reduce waste",
    ),
)

SMOLLM = PromptSet(
    name="smollm",
    description="Tuned for small local chat models (SmolLM2-135M-Instruct).",
    skeleton_examples=_EXAMPLES,
    skeleton_user=(
        "Question: {question}\n"
        "Give only the skeleton of the answer: a numbered list of 3 to 8 very short points (2-5 words each)."
    ),
    skeleton_prefill="1.",
    # One user turn for every point: the prefill alone says which point to write, so a point's prompt differs
    # from its siblings' only in its last few tokens and the shared part is computed once (measured on 12
    # Vicuna questions: prompt tokens computed 2431 -> 851, SoT time -16%, same answer lengths).
    point_user="Now explain each point in 1-2 short sentences.",
    point_prefill="{index}. {point}:",
    # The 135M model sometimes runs on; the slowest point sets SoT's latency, so hold it to its brief.
    point_max_sentences=2,
)

CHAT = PromptSet(
    name="chat",
    description="For capable chat models behind an API (GPT-4-class, Llama-3-70B, Qwen2.5).",
    system=(
        "You answer questions in two stages. First you write only a skeleton: a numbered list of 3 to 10 "
        "points of 3-5 words each, no explanations. Then, when asked for one point, you expand only that "
        "point in 1-2 sentences, without repeating other points."
    ),
    skeleton_examples=_EXAMPLES,
    skeleton_user="Question: {question}\nWrite only the skeleton of the answer.",
    skeleton_prefill="1.",
    point_user=(
        'Now expand point {index}, "{point}", in 1-2 concise sentences. '
        "Write only this point and do not continue with other points."
    ),
    point_prefill="{index}. {point}:",
)

BUILTIN: dict[str, PromptSet] = {p.name: p for p in (SMOLLM, CHAT)}


def builtin_prompt_set(name: str) -> PromptSet:
    """A built-in prompt set by name ("smollm", "chat")."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise ConfigError(f"unknown prompt set {name!r}; built-in sets: {', '.join(BUILTIN)}") from None


def load_prompt_set(name_or_text: str, *, name: str | None = None) -> PromptSet:
    """A built-in set by name, or one parsed from a file's text (the caller read the file)."""
    if name_or_text in BUILTIN:
        return BUILTIN[name_or_text]
    return parse_prompt_set(name_or_text, name=name or "custom")


__all__ = [
    "BUILTIN",
    "CHAT",
    "SMOLLM",
    "PromptSet",
    "builtin_prompt_set",
    "continuation_request",
    "fill",
    "load_prompt_set",
    "parse_prompt_set",
    "point_request",
    "render_skeleton",
    "skeleton_request",
]
