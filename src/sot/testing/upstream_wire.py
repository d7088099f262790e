"""Wire format of the test upstream: SSE chunks from byte templates, OpenAI error objects, status responses."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from sot.testing.upstream_options import format_seconds

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is optional; the standard library does the same, slower
    orjson = None  # type: ignore[assignment]

FINGERPRINT = "fp_sot_test"
DONE = b"data: [DONE]\n\n"
# What a broken proxy might forward: a line that is not JSON, and JSON that is not a chunk.
MALFORMED_JSON = b"{not json"
MALFORMED_SHAPE = b'{"choices":"x"}'

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
JSON_HEADERS = [(b"content-type", b"application/json")]


def json_bytes(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (orjson when installed)."""
    if orjson is not None:
        return orjson.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any) -> bytes:
    """One SSE event carrying `data` as JSON."""
    return b"data: " + json_bytes(data) + b"\n\n"


class ChunkEncoder:
    """The SSE events of one streamed answer. Everything but a token's text is rendered once, so a content
    chunk costs one string encoding and two concatenations."""

    __slots__ = ("_choice_head", "_head", "_token_head", "_token_tail", "_usage")

    def __init__(self, response_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":'
            + json_bytes(response_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + json_bytes(model)
            + b',"system_fingerprint":"'
            + FINGERPRINT.encode()
            + b'"'
        )
        self._choice_head = self._head + b',"choices":[{"index":0,"delta":'
        # With stream_options.include_usage, every chunk carries "usage": null but the last one.
        self._usage = b',"usage":null' if include_usage else b""
        self._token_head = self._choice_head + b'{"content":'
        self._token_tail = b'},"logprobs":null,"finish_reason":null}]' + self._usage + b"}\n\n"

    def role(self) -> bytes:
        """The first chunk: the assistant role with empty content."""
        return self._choice_head + b'{"role":"assistant","content":""' + self._token_tail

    def tokens(self, texts: list[str]) -> bytes:
        """One content chunk per text, concatenated."""
        head, tail = self._token_head, self._token_tail
        return b"".join([head + json_bytes(text) + tail for text in texts])

    def finish(self, reason: str) -> bytes:
        """The chunk with an empty delta and the finish reason."""
        return (
            self._choice_head
            + b'{},"logprobs":null,"finish_reason":'
            + json_bytes(reason)
            + b"}]"
            + self._usage
            + b"}\n\n"
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The include_usage chunk: no choices, the usage."""
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return self._head + b',"choices":[],"usage":' + json_bytes(usage) + b"}\n\n"


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


MID_STREAM_ERROR = error_body(
    "The model stopped unexpectedly (simulated by the sot test upstream).",
    "server_error",
    "simulated_mid_stream_error",
)


def status_error(status: int, retry_after: float) -> JSONResponse:
    """The response of a status fault: an OpenAI error object, and Retry-After on a 429."""
    headers: dict[str, str] = {}
    if status == 429:
        body = error_body("Rate limit reached (simulated by the sot test upstream).", "requests", "rate_limit_exceeded")
        headers["Retry-After"] = format_seconds(retry_after)
    elif status == 401:
        body = error_body(
            "Incorrect API key provided (simulated by the sot test upstream).",
            "invalid_request_error",
            "invalid_api_key",
        )
    elif status >= 500:
        body = error_body(
            "The server had an error while processing your request (simulated by the sot test upstream).",
            "server_error",
        )
    else:
        body = error_body(f"Simulated HTTP {status} from the sot test upstream.", "invalid_request_error")
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str) -> JSONResponse:
    """HTTP 400 with an OpenAI error object."""
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
