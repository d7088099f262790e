"""Server-sent events as bytes, built without per-chunk pydantic models: chat-completion chunks from bytes
templates made once per stream, JSON by orjson (the standard library's `json` when orjson is missing).

The JSON is exactly what OpenAI sends, key for key: `id`, `object`, `created`, `model`,
`system_fingerprint`, `choices`, then `usage` (null on every chunk but the last when the client asked for
usage) and this server's extras (`sot`, `sot_event`). Each message is complete ("data: ...\\n\\n") so that
several can go out in one write; JSON never contains a raw newline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json

from sot.events import Event


def _stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


_fast_dumps: Callable[[Any], bytes]
try:
    from orjson import dumps as _orjson_dumps

    _fast_dumps = _orjson_dumps
except ImportError:  # pragma: no cover - orjson is a dependency; this keeps a bare install working
    _fast_dumps = _stdlib_dumps


def _safe_dumps(fast: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def dumps(value: Any) -> bytes:
        try:
            return fast(value)
        except (TypeError, UnicodeEncodeError):
            # Text with a lone surrogate (a model can write one as a JSON escape) is not UTF-8: escape it.
            return json.dumps(value, separators=(",", ":")).encode()

    return dumps


dumps: Callable[[Any], bytes] = _safe_dumps(_fast_dumps)
"""Compact JSON as UTF-8 bytes."""

DONE = b"data: [DONE]\n\n"
_CHOICE_HEAD = b'[{"index":0,"delta":'
_NO_FINISH = b',"logprobs":null,"finish_reason":null}]'
_ROLE_DELTA = b'{"role":"assistant","content":""}'


def sse(data: bytes, event: str | None = None) -> bytes:
    """One SSE message around JSON `data` (or `[DONE]`), with an `event:` line when named."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


def event_json(event: Event | BaseModel) -> bytes:
    """An engine event as JSON (pydantic-core's serializer of the existing object: nothing is validated)."""
    return to_json(event)


def event_message(event: Event) -> bytes:
    """An engine event as the event stream sends it: `event: <type>` and its JSON."""
    return sse(event_json(event), event.type)


class ChunkWriter:
    """The `data:` messages of one chat-completions stream (its id, time and model are fixed once)."""

    def __init__(self, completion_id: str, created: int, model: str, *, include_usage: bool) -> None:
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._head = b"data: " + dumps(head)[:-1] + b',"system_fingerprint":null,"choices":'
        self._usage_null = b',"usage":null' if include_usage else b""
        self._end = self._usage_null + b"}\n\n"

    def role(self) -> bytes:
        """The first chunk: the assistant's role and empty content."""
        return self._head + _CHOICE_HEAD + _ROLE_DELTA + _NO_FINISH + self._end

    def content(self, text: str) -> bytes:
        """A chunk of answer text."""
        return self._head + _CHOICE_HEAD + b'{"content":' + dumps(text) + b"}" + _NO_FINISH + self._end

    def finish(self, reason: str, sot: dict[str, Any] | None = None) -> bytes:
        """The chunk with the finish reason and an empty delta; `sot` adds how the answer was made."""
        choice = _CHOICE_HEAD + b'{},"logprobs":null,"finish_reason":' + dumps(reason) + b"}]"
        extra = b',"sot":' + dumps(sot) if sot is not None else b""
        return self._head + choice + self._usage_null + extra + b"}\n\n"

    def engine_event(self, event: Event) -> bytes:
        """An engine event as an extra chunk without choices (`sot_events: true`)."""
        return self._head + b"[]" + self._usage_null + b',"sot_event":' + event_json(event) + b"}\n\n"

    def usage(self, usage: dict[str, int] | None) -> bytes:
        """The last chunk when the client asked for usage: no choices, and the usage (null if not measured)."""
        return self._head + b'[],"usage":' + dumps(usage) + b"}\n\n"


def error_message(body: dict[str, Any]) -> bytes:
    """An error object inside a stream whose headers are already out (the OpenAI SDK raises it)."""
    return sse(dumps(body))
