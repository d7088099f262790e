"""The deployment pieces of `sot serve` in-process: the routing key of a question or conversation, the routing
header on upstream requests, fallback kinds, request outcomes, request ids, readiness and the drain."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest.mock import ANY

import pytest

from sot.backends.base import GenerationRequest, Message
from sot.backends.openai_compat import OpenAIBackend
from sot.backends.scripted import ScriptedBackend
from sot.engine.run import cache_key
from sot.server import ServerSettings, create_app
from sot.server.admission import Gate
from sot.server.lifecycle import drain
from sot.server.observe import RequestRecord, fallback_kind, request_id
from sot.server.routing import routing_key, session_key

QUESTION = [Message("user", "What are some tips for staying healthy?")]


def test_a_question_without_a_session_is_keyed_by_its_conversation() -> None:
    key, chosen = routing_key({}, None, QUESTION, "X-SoT-Session")
    assert (key, chosen) == (cache_key(QUESTION), False)
    assert routing_key({}, None, [Message("user", "Another question?")], "X-SoT-Session")[0] != key


def test_a_client_names_its_conversation_by_header_or_user() -> None:
    assert routing_key({"X-SoT-Session": "conv-1"}, "alice", QUESTION, "X-SoT-Session") == ("conv-1", True)
    assert routing_key({"X-Affinity": "a-1"}, None, QUESTION, "X-Affinity") == ("a-1", True)
    assert routing_key({"X-SoT-Session": "conv-1"}, None, QUESTION, None) == ("conv-1", True)
    assert routing_key({}, "alice@example.com", QUESTION, "X-SoT-Session") == ("alice@example.com", True)
    # Anything that cannot go in a header as it is (or is long) is hashed, the same way every time.
    odd = session_key("Zoë Müller")
    assert odd.startswith("u-") and odd.isascii() and odd == session_key("Zoë Müller") != session_key("Zoe")
    assert session_key("x" * 500).startswith("u-")


def test_the_openai_backend_sends_the_key_in_the_routing_header() -> None:
    request = GenerationRequest(messages=tuple(QUESTION), cache_key="sot-abc")
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1")
    body, headers = backend._payload(request)
    assert headers == {"X-SoT-Session": "sot-abc"}
    assert "sot-abc" not in body.values()  # no body field unless the API takes one
    backend.routing_header = "X-Affinity"
    assert backend._payload(request)[1] == {"X-Affinity": "sot-abc"}
    backend.routing_header = None
    assert backend._payload(request)[1] == {}
    unsafe = GenerationRequest(messages=tuple(QUESTION), cache_key="Zoë")
    assert OpenAIBackend("m", base_url="http://127.0.0.1:9/v1")._payload(unsafe)[1] == {}


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (None, None),
        ("the skeleton request failed: BackendStatusError: upstream answered 500", "skeleton_failed"),
        ("the skeleton had 1 usable point(s); at least 2 are needed", "too_few_points"),
        ("point 2 failed after 3 attempt(s): BackendStreamError: cut", "point_failed"),
        ("something new", "other"),
    ],
)
def test_fallback_reasons_fall_into_a_few_kinds(reason: str | None, kind: str | None) -> None:
    assert fallback_kind(reason) == kind


def test_request_ids_are_the_clients_when_sane() -> None:
    assert request_id("req-1.a:b") == "req-1.a:b"
    for given in (None, "", "has space", "x" * 200, "ünï"):
        made = request_id(given)
        assert made != given and len(made) == 32


def test_outcomes() -> None:
    def outcome(**fields: object) -> str:
        record = RequestRecord("r", question=True)
        for name, value in fields.items():
            setattr(record, name, value)
        return record.outcome

    assert outcome(status=429, rejected="overloaded") == "rejected"
    assert outcome(status=429) == "error"  # the upstream's rate limit
    assert outcome(status=200, error_code="upstream_error") == "error"
    assert outcome(status=400) == "invalid"
    assert outcome(status=499) == "cancelled"
    assert outcome(status=200) == "cancelled"  # a stream whose client left before the answer was done
    assert outcome(status=200, stopped=True) == "ok"


async def call(app: Any, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, dict[str, str], Any]:
    """One request to an ASGI app: (status, headers, JSON body or text)."""
    data = json.dumps(body).encode() if body is not None else b""
    raw = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode()) for k, v in headers.items())]
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode()}
    scope |= {"query_string": b"", "headers": raw, "scheme": "http", "server": ("t", 80), "client": ("c", 1)}
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    out = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    text = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    return start["status"], out, json.loads(text) if "json" in out.get("content-type", "") else text


async def test_readiness_and_the_503_while_draining() -> None:
    app = create_app(ScriptedBackend(), ServerSettings(retry_after=2, drain_seconds=1))
    chat = {"model": "normal:x", "messages": [{"role": "user", "content": "Hi?"}]}
    assert await call(app, "GET", "/ready") == (200, ANY, {"status": "ready"})
    status, headers, _ = await call(app, "POST", "/v1/chat/completions", chat, **{"X-Request-ID": "abc"})
    assert (status, headers["x-request-id"]) == (200, "abc")
    await drain(app.state.sot)
    status, headers, body = await call(app, "GET", "/ready")
    assert (status, headers["retry-after"], body) == (503, "2", {"status": "draining"})
    assert (await call(app, "GET", "/health"))[2]["ready"] is False
    status, headers, body = await call(app, "POST", "/v1/chat/completions", chat)
    assert (status, headers["retry-after"], body["error"]["code"]) == (503, "2", "server_draining")
    assert (await call(app, "GET", "/metrics"))[0] == 404  # metrics are off by default


async def test_the_gate_reports_when_it_is_idle() -> None:
    gate = Gate(2)
    assert await gate.wait_idle(0)
    lease = gate.enter()
    assert not await gate.wait_idle(0.01)
    asyncio.get_running_loop().call_later(0.02, lease.release)
    assert await gate.wait_idle(1)
