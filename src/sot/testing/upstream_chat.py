"""POST /v1/chat/completions of the test upstream: parse the request, decide its answer and fault, send it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from sot.testing.upstream_answers import Msg, plan_answer, word_count
from sot.testing.upstream_options import BadRequest, Overrides, parse_overrides
from sot.testing.upstream_reply import Reply, answer, json_reply, stream_reply
from sot.testing.upstream_stats import RequestRecord, UpstreamState
from sot.testing.upstream_wire import bad_request, status_error


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the test upstream looks at."""

    overrides: Overrides
    messages: list[Msg]
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None
    prompt_cache_key: str | None
    user: str | None


def _parse_messages(raw: object) -> list[Msg]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list")
    messages: list[Msg] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadRequest("each message must be an object with a role")
        content = item.get("content")
        if isinstance(content, list):
            # Content parts: keep the text ones.
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest("message content must be a string or a list of parts")
        messages.append(Msg(item["role"], content))
    return messages


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{key} must be a non-negative integer")
    return value


def _stop_strings(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest("stop must be a string or a list of strings")


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) and value else None


def parse_chat_request(body: object, headers: Mapping[str, str]) -> ChatRequest:
    """The request's answer-relevant parts; raises BadRequest for a malformed one. Unknown fields are ignored."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    overrides = parse_overrides(body.get("sot_test"), headers.get("x-test-fault"), headers.get("x-test-options"))
    caps = [
        v for v in (_optional_int(body, "max_tokens"), _optional_int(body, "max_completion_tokens")) if v is not None
    ]
    stream_options = body.get("stream_options") or {}
    return ChatRequest(
        overrides=overrides,
        messages=_parse_messages(body.get("messages")),
        max_tokens=min(caps) if caps else None,
        stop=_stop_strings(body.get("stop")),
        stream=bool(body.get("stream", False)),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        model=_optional_str(body, "model"),
        prompt_cache_key=_optional_str(body, "prompt_cache_key"),
        user=_optional_str(body, "user"),
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """When a request arrived, on each clock."""

    loop_time: float
    monotonic: float
    wall: float

    @staticmethod
    def now() -> Arrival:
        return Arrival(asyncio.get_running_loop().time(), time.monotonic(), time.time())


class ChatCompletions:
    """POST /v1/chat/completions as a plain ASGI app, so nothing wraps `send` for each chunk."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = Arrival.now()
        request = Request(scope, receive)
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise BadRequest("The request body is not valid JSON.") from exc
            chat = parse_chat_request(body, request.headers)
        except BadRequest as exc:
            await bad_request(str(exc))(scope, receive, send)
            return
        reply = self._reply(chat, request.headers, arrival)
        produce = stream_reply if chat.stream else json_reply
        await answer(self.state, reply, status_error, lambda: produce(reply, send), scope, receive, send)

    def _reply(self, chat: ChatRequest, headers: Headers, arrival: Arrival) -> Reply:
        """Plan the answer, roll the fault dice and open the request's record."""
        state, overrides = self.state, chat.overrides
        options = replace(state.options, **{k: v for k, v in overrides.options.items() if k != "fault"})
        model = chat.model or options.model
        plan = plan_answer(
            chat.messages,
            options,
            tokens=overrides.tokens,
            kind=overrides.kind,
            max_tokens=chat.max_tokens,
            stop=chat.stop,
        )
        fault = state.roll_fault(plan.kind, overrides.options)
        last_user = next((m.content for m in reversed(chat.messages) if m.role == "user"), "")
        record = RequestRecord(
            id=f"chatcmpl-sottest{next(state.ids):06d}",
            index=state.started,
            kind=plan.kind,
            stream=chat.stream,
            fault=fault,
            model=model,
            max_tokens=chat.max_tokens,
            prompt_tokens=sum(word_count(m.content) for m in chat.messages),
            prompt_cache_key=chat.prompt_cache_key,
            last_user=last_user[:200],
            started_at=arrival.wall,
            started_monotonic=arrival.monotonic,
            user=chat.user,
            headers=state.recorded(headers),
            planned_tokens=len(plan.tokens),
        )
        return Reply(
            record=record,
            plan=plan,
            fault=fault,
            options=options,
            model=model,
            include_usage=chat.include_usage,
            arrived=arrival.loop_time,
            created=int(arrival.wall),
        )
