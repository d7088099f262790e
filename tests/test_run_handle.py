"""The run handle (events of a run read in batches from its task) and the streamed response written from them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sot.backends.scripted import ScriptedBackend
from sot.engine import Engine
from sot.engine.handle import Emit, Failed, RunHandle
from sot.errors import BackendStatusError, SoTError
from sot.events import AnswerDelta, Done, ErrorEvent, Event, Result, Stats
from sot.server.sse import PING, EventStreamResponse


def _result() -> Result:
    return Result(
        mode_requested="normal",
        mode_used="normal",
        answer="ab",
        complete=True,
        finish_reason="stop",
        backend="b",
        model="m",
        stats=Stats(),
    )


def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_a_batch_is_everything_that_arrived_and_done_ends_the_run() -> None:
    release = asyncio.Event()
    seen: list[Event] = []

    async def work(emit: Emit) -> None:
        emit(AnswerDelta(text="a"))
        emit(AnswerDelta(text="b"))
        await release.wait()
        emit(Done(result=_result()))

    handle = RunHandle(work, seen.append)
    first = await handle.next_batch()
    assert [e.text for e in first] == ["a", "b"]  # type: ignore[union-attr]
    assert await handle.next_batch(0.05) is None  # nothing within the wait: no event lost, none invented
    release.set()
    last = await handle.next_batch()
    assert last is not None and isinstance(last[-1], Done)
    assert await handle.next_batch() == [] and await handle.next_batch() == []
    assert seen == [*first, *last]  # the observer saw each event as it was emitted
    await handle.aclose()
    assert handle.task.done()


async def test_a_failed_run_hands_over_its_error_event_then_raises_the_error() -> None:
    async def work(emit: Emit) -> None:
        emit(AnswerDelta(text="a"))
        emit(Failed(BackendStatusError("upstream answered 500", status_code=500, backend="b")))

    handle = RunHandle(work, None)
    batch = await handle.next_batch()
    assert batch is not None and isinstance(batch[-1], ErrorEvent) and batch[-1].kind == "BackendStatusError"
    with pytest.raises(BackendStatusError):
        await handle.next_batch()
    assert await handle.next_batch() == []
    await handle.aclose()


async def test_abort_cancels_the_work_and_the_reader_gets_the_error_after_what_came_first() -> None:
    cancelled = asyncio.Event()

    async def work(emit: Emit) -> None:
        emit(AnswerDelta(text="a"))
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    handle = RunHandle(work, None)
    await asyncio.sleep(0)
    handle.abort(SoTError("client gone"))
    batch = await handle.next_batch()
    assert batch is not None and [e.text for e in batch] == ["a"]  # type: ignore[union-attr]
    with pytest.raises(SoTError, match="client gone"):
        await handle.next_batch()
    await asyncio.wait_for(cancelled.wait(), 1)
    await handle.aclose()
    assert not _tasks()


async def test_aclose_cancels_a_running_engine_and_leaves_no_task() -> None:
    backend = ScriptedBackend(ttft=10.0)
    handle = Engine(backend).start("How can I sleep better?", "sot")
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await handle.aclose()
    assert handle.task.cancelled() or handle.task.done()
    assert not _tasks()


def test_bad_input_is_refused_before_any_task_starts() -> None:
    async def main() -> None:
        with pytest.raises(SoTError):
            Engine(ScriptedBackend()).start("", "sot")
        assert not _tasks()

    asyncio.run(main())


async def _drive(response: EventStreamResponse) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    await response({"type": "http"}, receive, send)
    return sent


async def test_the_event_stream_has_no_length_sends_each_chunk_and_closes_once() -> None:
    closed: list[str] = []

    async def body() -> Any:
        yield b"data: 1\n\n"
        yield PING
        yield b"data: 2\n\n"

    async def on_close() -> None:
        closed.append("closed")

    sent = await _drive(EventStreamResponse(body(), {"X-SoT-Mode": "sot"}, on_close))
    head = dict(sent[0]["headers"])
    assert sent[0]["status"] == 200 and b"content-length" not in head
    assert head[b"content-type"].startswith(b"text/event-stream") and head[b"x-sot-mode"] == b"sot"
    assert head[b"cache-control"] == b"no-cache" and head[b"x-accel-buffering"] == b"no"
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b": ping\n\n", b"data: 2\n\n", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, True, False]
    assert closed == ["closed"]


async def test_a_failing_body_still_closes_the_run() -> None:
    closed: list[str] = []

    async def body() -> Any:
        yield b"data: 1\n\n"
        raise RuntimeError("boom")

    async def on_close() -> None:
        closed.append("closed")

    with pytest.raises(RuntimeError):
        await _drive(EventStreamResponse(body(), {}, on_close))
    assert closed == ["closed"]
