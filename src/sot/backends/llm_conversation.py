"""A `GenerationRequest` as an `llm` prompt: a conversation of earlier turns, or a transcript for single-turn models.

`llm` plugins read a prompt's history in one of two ways: newer ones from `prompt.messages` (the whole chain,
passed as `messages=`), older ones from `conversation.responses` (each earlier turn as a finished response)
plus `prompt.prompt` and `prompt.system`. Both are given, so either kind sees the same conversation. A model
that declares `supports_conversation = False` gets one prompt with the earlier turns written out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sot.backends.base import GenerationRequest

CONTINUE = "Continue your reply exactly where it stopped, without repeating anything."


@dataclass(frozen=True, slots=True)
class Turns:
    """A request as `llm` takes it: a system prompt, finished (user, assistant) exchanges, and the new prompt."""

    system: str | None
    history: list[tuple[str, str]] = field(default_factory=list)
    prompt: str = ""


def split_turns(request: GenerationRequest) -> Turns:
    """The system text, the earlier exchanges (consecutive turns of one role merged) and the final user turn.

    A conversation that ends with the assistant (an unfinished reply) is asked to continue it.
    """
    system = "\n\n".join(m.content for m in request.messages if m.role == "system") or None
    turns: list[list[str]] = []
    for message in request.messages:
        if message.role == "system":
            continue
        if turns and turns[-1][0] == message.role:
            turns[-1][1] += "\n\n" + message.content
        else:
            turns.append([message.role, message.content])
    prompt = CONTINUE
    if turns and turns[-1][0] == "user":
        prompt = turns.pop()[1]
    history: list[tuple[str, str]] = []
    pending_user = ""
    for role, text in turns:
        if role == "user":
            pending_user = text
        else:
            history.append((pending_user, text))
            pending_user = ""
    return Turns(system=system, history=history, prompt=prompt)


def render_transcript(turns: Turns) -> str:
    """The earlier exchanges written out before the new prompt, for a model without conversations."""
    if not turns.history:
        return turns.prompt
    lines = ["The conversation so far:", ""]
    for user, assistant in turns.history:
        if user:
            lines += [f"User: {user}", ""]
        lines += [f"Assistant: {assistant}", ""]
    lines += [f"User: {turns.prompt}", "", "Answer the last message as the assistant."]
    return "\n".join(lines)


def _finished(llm: Any, model: Any, prompt: str, system: str | None, text: str, is_async: bool) -> Any:
    """An earlier exchange as a finished `llm` response (what older plugins read from `conversation.responses`)."""
    if is_async:
        return llm.AsyncResponse.fake(model, prompt, system=system, response=text)
    response = llm.Response(llm.Prompt(prompt, model=model, system=system), model, stream=False)
    response._done = True  # as AsyncResponse.fake does: the response is complete, its text known
    response._chunks = [text]
    return response


def build_prompt(
    llm: Any, model: Any, turns: Turns, options: dict[str, Any], *, is_async: bool, key: str | None
) -> Any:
    """The `llm` response object (not yet run) for `turns` on `model`, with `options` as model options."""
    extra: dict[str, Any] = {"key": key} if key else {}
    if not getattr(model, "supports_conversation", True):
        return model.prompt(render_transcript(turns), system=turns.system, options=options, **extra)
    conversation = model.conversation()
    chain: list[Any] = [llm.system(turns.system)] if turns.system else []
    for user, assistant in turns.history:
        conversation.responses.append(_finished(llm, model, user, turns.system, assistant, is_async))
        if user:
            chain.append(llm.user(user))
        chain.append(llm.assistant(assistant))
    return conversation.prompt(turns.prompt, system=turns.system, messages=chain, options=options, **extra)
