"""The engine's events relayed to a client: as chat-completion chunks (the answer text in order, cut at stop
strings, then the finish reason, `sot` and `usage`), as the engine's own event stream, or as one completion."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from fastapi.responses import Response

from sot.events import Done, ErrorEvent, Event, Result
from sot.server.answer import AnswerText, StopFilter, sot_info, usage
from sot.server.chunks import DONE, ChunkWriter, dumps, error_message, event_message
from sot.server.errors import map_error
from sot.server.observe import current_record
from sot.server.parsing import ChatPlan
from sot.server.pump import ClientGone, EventPump, batches, final_result
from sot.server.sse import PING, EventStreamResponse


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatRelay:
    """Turns one stream's batches of engine events into chat-completion chunks."""

    def __init__(self, writer: ChunkWriter, stops: Sequence[str], *, sot_events: bool) -> None:
        self.writer = writer
        self.text = AnswerText()
        self.cut = StopFilter(stops)
        self.sot_events = sot_events
        self.result: Result | None = None

    def batch(self, events: Sequence[Event]) -> bytes:
        """The chunks for `events`, in one write: each piece of answer text its own chunk, as the upstream sent
        it (a server that falls behind writes more chunks at once, never bigger ones); with `sot_events`,
        the engine's events between them in order."""
        out: list[bytes] = []
        for i, event in enumerate(events):
            if self.sot_events:
                out.append(self.writer.engine_event(event))
            if isinstance(event, ErrorEvent):
                continue  # the exception follows
            if isinstance(event, Done):
                self.result = event.result
                text = self.cut.push(self.text.finish(event.result)) + self.cut.flush()
            else:
                text = self.cut.push(self.text.feed(event))
            if text:
                out.append(self.writer.content(text))
            if self.cut.hit:
                # The engine may have finished within this batch: then its counts are known.
                self.result = self.result or next((e.result for e in events[i + 1 :] if isinstance(e, Done)), None)
                break
        return b"".join(out)

    def closing(self, include_usage: bool) -> bytes:
        """The finish chunk, the usage chunk if asked for, and [DONE].

        Usage is the engine's measurement, or null when the stream stopped at a stop string before the
        engine finished (its run was cancelled uncounted): never an estimate.
        """
        if self.result is not None:
            reason = "stop" if self.cut.hit else self.result.finish_reason
            tail = [self.writer.finish(reason, sot_info(self.result))]
        else:
            tail = [self.writer.finish("stop")]
        if include_usage:
            tail.append(self.writer.usage(usage(self.result)))
        tail.append(DONE)
        return b"".join(tail)


async def chat_chunks(
    primed: list[Event], pump: EventPump, plan: ChatPlan, retry_after: int, ping: float
) -> AsyncGenerator[bytes, None]:
    """A chat-completions stream over a primed pump, to its end (or an error object in the stream), with a
    keep-alive comment after every `ping` seconds without an event."""
    writer = ChunkWriter(completion_id(), int(time.time()), plan.model, include_usage=plan.include_usage)
    relay = ChatRelay(writer, plan.stops, sot_events=plan.sot_events)
    try:
        yield writer.role()
        async for batch in batches(primed, pump, ping):
            out = relay.batch(batch) if batch else PING
            if out:
                yield out
            if relay.cut.hit:
                current_record().stopped = True
                break
    except ClientGone:
        return  # nobody to tell
    except Exception as exc:
        # Headers are out: report the failure in the stream, as OpenAI does (the SDK raises APIError).
        error = map_error(exc, retry_after)
        current_record().failed(error.code)
        yield error_message(error.body())
        return
    finally:
        await pump.aclose()
    yield relay.closing(plan.include_usage)


async def engine_events(
    primed: list[Event], pump: EventPump, retry_after: int, ping: float
) -> AsyncGenerator[bytes, None]:
    """The engine's own events as SSE (`event: <type>`), ending with an `error` event if the run failed; a
    keep-alive comment after every `ping` seconds without an event."""
    last: Event | None = None
    try:
        async for batch in batches(primed, pump, ping):
            if not batch:
                yield PING
                continue
            last = batch[-1]
            yield b"".join(event_message(event) for event in batch)
    except ClientGone:
        return
    except Exception as exc:
        if isinstance(last, ErrorEvent):
            current_record().failed(last.kind)
        else:
            error = map_error(exc, retry_after)
            current_record().failed(error.code)
            yield event_message(ErrorEvent(error=error.message, kind=type(exc).__name__))
    finally:
        await pump.aclose()


def sse_response(body: AsyncGenerator[bytes, None], pump: EventPump, headers: dict[str, str]) -> Response:
    """A streamed response of SSE bytes; the pump is closed however the response ends."""
    return EventStreamResponse(body, headers, pump.aclose)


async def complete(pump: EventPump, plan: ChatPlan, retry_after: int) -> Response:
    """A non-streamed chat completion: the run's result as one JSON object (499 if the client left first)."""
    try:
        result: Result = await final_result(pump)
    except ClientGone:
        return Response(status_code=499)
    except Exception as exc:
        error = map_error(exc, retry_after)
        current_record().failed(error.code)
        raise error from exc
    finally:
        await pump.aclose()
    answer, finish = result.answer, result.finish_reason
    if plan.stops:
        cut = StopFilter(plan.stops)
        answer = cut.push(answer) + cut.flush()
        finish = "stop" if cut.hit else finish
    body = {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage(result),
        "sot": sot_info(result),
    }
    headers = {"X-SoT-Mode": plan.mode, "X-SoT-Mode-Used": result.mode_used}
    return Response(dumps(body), media_type="application/json", headers=headers)
