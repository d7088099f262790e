"""POST /v1/messages of the test upstream: Anthropic's Messages API, with the answers, timing and faults of the
chat completions endpoint (see `sot.testing.upstream`) and `cache_control` accounting (`upstream_cache`).

What it checks as Anthropic's API does: an `x-api-key` (or bearer) header (else 401) and an
`anthropic-version` header; `model`, `max_tokens` (>= 1) and a non-empty `messages` list of user and
assistant turns with non-empty text; a final assistant turn (the prefill) that does not end in whitespace;
stop sequences that are not whitespace only; at most 4 `cache_control` breakpoints. Each is a 400 with an
Anthropic error object otherwise. The system prompt (a string or text blocks) counts as instructions, as a
system message does for chat completions. Faults: an HTTP status (429 and 529 carry `retry-after`), and the
stream faults of the chat endpoint (`error-mid-stream` is an `overloaded_error` event).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from sot.testing.upstream_answers import Msg, plan_answer, word_count
from sot.testing.upstream_anthropic_wire import MessageReply, json_message, status_error, stream_message
from sot.testing.upstream_cache import MAX_BREAKPOINTS, Block
from sot.testing.upstream_chat import Arrival
from sot.testing.upstream_options import BadRequest, Overrides, parse_overrides
from sot.testing.upstream_reply import Reply, answer
from sot.testing.upstream_stats import RequestRecord, UpstreamState


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """The parts of a Messages API request the test upstream looks at."""

    overrides: Overrides
    messages: list[Msg]  # the system prompt first (role "system"), then the turns, as the answers see them
    blocks: list[Block]  # every content block in order, for the prompt cache
    model: str
    max_tokens: int
    stop: list[str]
    stream: bool


def _cache_mark(block: Mapping[str, Any]) -> bool:
    control = block.get("cache_control")
    if control is None:
        return False
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise BadRequest('cache_control must be {"type": "ephemeral"} (with an optional ttl)')
    if control.get("ttl", "5m") not in ("5m", "1h"):
        raise BadRequest("cache_control.ttl must be 5m or 1h")
    return True


def _text_blocks(content: object, where: str) -> list[tuple[str, bool]]:
    """(text, marked) of each block of a content field: a string, or a list of text blocks."""
    if isinstance(content, str):
        return [(content, False)]
    if not isinstance(content, list) or not content:
        raise BadRequest(f"{where}: content must be a string or a non-empty list of content blocks")
    blocks = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequest(f"{where}: the sot test upstream takes only text content blocks")
        blocks.append((block["text"], _cache_mark(block)))
    return blocks


def _parse_turns(raw: object, blocks: list[Block]) -> list[Msg]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: at least one message is required")
    turns: list[Msg] = []
    for number, item in enumerate(raw):
        where = f"messages.{number}"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f'{where}: unexpected role {role!r}; use "user" or "assistant" (and the system field)')
        parts = _text_blocks(item.get("content"), where)
        for text, marked in parts:
            if not text:
                raise BadRequest(f"{where}: text content blocks must be non-empty")
            blocks.append(Block(f"{role}:{text}".encode(), word_count(text), marked))
        turns.append(Msg(role, "".join(text for text, _ in parts)))
    if turns[-1].role == "assistant" and turns[-1].content != turns[-1].content.rstrip():
        raise BadRequest("messages: final assistant content cannot end with trailing whitespace")
    return turns


def _stop_sequences(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest("stop_sequences must be a list of strings")
    if any(not s.strip() for s in value):
        raise BadRequest("stop_sequences: each stop sequence must contain non-whitespace characters")
    return list(value)


def parse_messages_request(body: object, headers: Mapping[str, str]) -> MessagesRequest:
    """The request's answer-relevant parts; raises BadRequest for a malformed one. Unknown fields are ignored."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    overrides = parse_overrides(body.get("sot_test"), headers.get("x-test-fault"), headers.get("x-test-options"))
    model, max_tokens = body.get("model"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens: must be an integer >= 1")
    blocks: list[Block] = []
    messages: list[Msg] = []
    system = body.get("system")
    if system is not None:
        parts = _text_blocks(system, "system")
        blocks.extend(Block(f"system:{text}".encode(), word_count(text), marked) for text, marked in parts)
        messages.append(Msg("system", "\n".join(text for text, _ in parts)))
    messages.extend(_parse_turns(body.get("messages"), blocks))
    marks = sum(block.marked for block in blocks)
    if marks > MAX_BREAKPOINTS:
        raise BadRequest(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {marks}.")
    return MessagesRequest(
        overrides=overrides,
        messages=messages,
        blocks=blocks,
        model=model,
        max_tokens=max_tokens,
        stop=_stop_sequences(body.get("stop_sequences")),
        stream=bool(body.get("stream", False)),
    )


class Messages:
    """POST /v1/messages as a plain ASGI app, so nothing wraps `send` for each event."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = Arrival.now()
        request = Request(scope, receive)
        headers = request.headers
        if not headers.get("x-api-key") and not headers.get("authorization"):
            await status_error(401, message="x-api-key header is required")(scope, receive, send)
            return
        try:
            if not headers.get("anthropic-version"):
                raise BadRequest("anthropic-version: header is required")
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise BadRequest("The request body is not valid JSON.") from exc
            parsed = parse_messages_request(body, headers)
        except BadRequest as exc:
            await status_error(400, message=str(exc))(scope, receive, send)
            return
        message = self._reply(parsed, headers, arrival)
        produce = stream_message if parsed.stream else json_message
        await answer(self.state, message.reply, status_error, lambda: produce(message, send), scope, receive, send)

    def _reply(self, parsed: MessagesRequest, headers: Mapping[str, str], arrival: Arrival) -> MessageReply:
        """Plan the answer, roll the fault dice, account for the prompt cache and open the request's record."""
        state, overrides = self.state, parsed.overrides
        options = replace(state.options, **{k: v for k, v in overrides.options.items() if k != "fault"})
        plan_args: dict[str, Any] = {"tokens": overrides.tokens, "kind": overrides.kind}
        plan = plan_answer(parsed.messages, options, max_tokens=parsed.max_tokens, stop=parsed.stop, **plan_args)
        whole = "".join(plan_answer(parsed.messages, options, **plan_args).tokens)
        found = [stop for stop in parsed.stop if stop in whole]
        stop_sequence = min(found, key=whole.find) if found and len("".join(plan.tokens)) < len(whole) else None
        fault = state.roll_fault(plan.kind, overrides.options)
        refused = fault is not None and fault.isdigit()
        usage = state.prompt_cache.account(parsed.model, [] if refused else parsed.blocks)
        last_user = next((m.content for m in reversed(parsed.messages) if m.role == "user"), "")
        record = RequestRecord(
            id=f"msg_sottest{next(state.ids):06d}",
            index=state.started,
            kind=plan.kind,
            stream=parsed.stream,
            fault=fault,
            model=parsed.model,
            max_tokens=parsed.max_tokens,
            prompt_tokens=sum(block.tokens for block in parsed.blocks),
            prompt_cache_key=None,
            last_user=last_user[:200],
            started_at=arrival.wall,
            started_monotonic=arrival.monotonic,
            headers=state.recorded(headers),
            planned_tokens=len(plan.tokens),
            api="messages",
            prefill=parsed.messages[-1].content if parsed.messages[-1].role == "assistant" else None,
            input_tokens=usage.input_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens,
            cache_read_input_tokens=usage.cache_read_input_tokens,
        )
        reply = Reply(
            record=record,
            plan=plan,
            fault=fault,
            options=options,
            model=parsed.model,
            include_usage=True,
            arrived=arrival.loop_time,
            created=int(arrival.wall),
        )
        return MessageReply(reply=reply, usage=usage, stop_sequence=stop_sequence)
