"""Sticky upstream routing: the one key every upstream request of a question carries (a conversation's, when
the client names one), and the client's request id forwarded upstream as `X-Request-ID`.

The key goes to the engine as its session (`Engine.stream(..., session=key)`), which puts it on every
request of the run; the OpenAI-compatible backend sends it in its routing header (`X-SoT-Session`), on which
a load balancer in front of the model replicas hashes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sot.backends.base import Backend, Message
from sot.engine.run import cache_key
from sot.server.observe import REQUEST_ID_HEADER, current_request_id

SESSION_HEADER = "X-SoT-Session"
_SAFE_KEY = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def session_key(value: str) -> str:
    """A client's session name as a routing key: itself when it is a short header-safe token, else its hash."""
    if _SAFE_KEY.fullmatch(value):
        return value
    return "u-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def routing_key(
    headers: Mapping[str, str], user: str | None, messages: Sequence[Message], header: str | None
) -> tuple[str, bool]:
    """The question's routing key, and whether the client chose it.

    The client names a conversation with the routing header (`header`, or `X-SoT-Session`) or the body's
    `user` field; every turn then reaches the same replica. Otherwise the key is derived from the
    conversation, so the skeleton and the points of one question share it.
    """
    for name in dict.fromkeys(n for n in (header, SESSION_HEADER) if n):
        value = headers.get(name)
        if value and value.strip():
            return session_key(value.strip()), True
    if user and user.strip():
        return session_key(user.strip()), True
    return cache_key(messages), False


async def _add_request_id(request: Any) -> None:
    request_id = current_request_id()
    if request_id is not None and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = request_id


def forward_request_ids(backend: Backend) -> bool:
    """Make the backend's HTTP client send the id of the request being answered as `X-Request-ID` on every
    upstream request (an httpx request hook on the OpenAI SDK's client; other backends are left alone)."""
    http = getattr(getattr(backend, "client", None), "_client", None)
    hooks = getattr(http, "event_hooks", None)
    if not isinstance(hooks, dict) or not isinstance(hooks.get("request"), list):
        return False
    if _add_request_id not in hooks["request"]:
        hooks["request"].append(_add_request_id)
    return True
