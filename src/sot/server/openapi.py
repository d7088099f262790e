"""The server's OpenAPI document: the error and stream responses each endpoint declares, and the adjustments
that make the generated schema tell the truth (400s, not 422s; auth only when required; the event schemas)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from sot.events import EventAdapter
from sot.server.openai_schema import ChatCompletion, ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid or unsupported request"),
        (401, "Missing or wrong API key"),
        (413, "Request body too large"),
        (429, "Too many questions in flight, or the upstream is rate limiting (see Retry-After)"),
        (500, "Server error"),
        (502, "The model upstream failed"),
        (503, "The server is draining before a restart, or the model has no room now (see Retry-After)"),
        (504, "The model upstream timed out"),
    )
}

# One event of a chat-completions stream: a chunk as JSON, an error object, or the final "[DONE]".
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}

CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answer: JSON, or with `stream: true` an SSE stream of chunks ending in [DONE]",
        "model": ChatCompletion,
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    },
    **ERROR_RESPONSES,
}

EVENT_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The engine's events (`sot.events`) as SSE: `event: <type>`, `data: <json>`",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string"},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"$ref": "#/components/schemas/Event"},
                        },
                    },
                }
            }
        },
    },
    **ERROR_RESPONSES,
}


def install_openapi(app: FastAPI, *, auth: bool) -> None:
    """Replace `app.openapi` by the generated schema with this server's adjustments."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        # The schema tells the truth about auth: without a key the bearer scheme is not required anywhere.
        schema = generate()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                # Invalid requests are 400s here (as OpenAI answers them), never FastAPI's 422.
                operation.get("responses", {}).pop("422", None)
                if not auth:
                    operation.pop("security", None)
        if not auth:
            schema.get("components", {}).pop("securitySchemes", None)
        # The event stream's data are the engine's events: publish their schemas beside the API's own.
        events = EventAdapter.json_schema(ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(events.pop("$defs", {}))
        schema["components"]["schemas"]["Event"] = events
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
