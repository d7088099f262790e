"""Validating a conversation before anything is sent: roles, text, size, and text that can be encoded at all.

One rule, written once: the engine calls it for every run and the server for every request, so bad input
gets the same clear `InputError` (a 400 in the server) before any request goes out.

>>> normalize_conversation("Why is the sky blue?")
[Message(role='user', content='Why is the sky blue?')]
>>> normalize_conversation("bad \\ud800 surrogate?")
Traceback (most recent call last):
...
sot.errors.InputError: message 1 is not valid Unicode text: a lone surrogate '\\ud800' at character 5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sot.backends.base import Message
from sot.errors import InputError

Conversation = str | Sequence[Message] | Sequence[Mapping[str, Any]]
ROLES = ("system", "user", "assistant")


def normalize_conversation(conversation: Conversation, *, max_chars: int | None = None) -> list[Message]:
    """Accept a question, `Message`s or OpenAI-style dicts; return a validated conversation.

    It must end with a non-empty user message, every text must be encodable as UTF-8 (no lone
    surrogates), and all texts together must stay within `max_chars`.
    """
    if isinstance(conversation, str):
        messages = [Message("user", conversation)]
    else:
        messages = [_message(item) for item in conversation]
    if not messages or messages[-1].role != "user":
        raise InputError("the conversation must end with a user message")
    if not messages[-1].content.strip():
        raise InputError("the question is empty")
    for number, message in enumerate(messages, start=1):
        check_encodable(message.content, f"message {number}")
    if max_chars is not None:
        size = sum(len(m.content) for m in messages)
        if size > max_chars:
            raise InputError(f"the conversation has {size:,} characters; the limit is {max_chars:,}")
    return messages


def _message(item: Message | Mapping[str, Any]) -> Message:
    if isinstance(item, Message):
        if item.role not in ROLES or not isinstance(item.content, str):
            raise InputError(f"each message needs a role (system/user/assistant) and text content: {item!r}")
        return item
    if not isinstance(item, Mapping):
        raise InputError(f"each message must be an object with a role and content: {item!r}")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES or not isinstance(content, str):
        raise InputError(f"each message needs a role (system/user/assistant) and text content: {item!r}")
    return Message(role, content)


def check_encodable(text: str, where: str) -> None:
    """Raise `InputError` if `text` cannot be sent as UTF-8 (a lone surrogate, as from broken JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise InputError(
            f"{where} is not valid Unicode text: a lone surrogate {bad!r} at character {exc.start + 1}"
        ) from None
