"""Graceful restarts of `sot serve` as a real process (one worker, and two under the supervisor): SIGTERM while 20
streamed SoT answers are in flight. All 20 finish, complete, within the drain time; meanwhile /ready is 503,
/health stays 200, and new questions get 503 with Retry-After; the process exits 0; the upstream saw every
request finish and none left open or cancelled. A drain time shorter than the answers cancels them instead."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from sot.testing.process import ServiceProcess, serve_command
from upstream_helpers import get_stats, running_upstream

STREAMS = 20
DRAIN = 20.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Each answer takes about 2.5 s: a short skeleton, then 3 points of 80 tokens at 40 tokens a second.
UPSTREAM: dict[str, Any] = {"ttft": 0.05, "tokens_per_second": 40, "tokens_per_answer": 80, "skeleton_points": 3}
QUESTION = "Tips for staying healthy?"


def popen(process: ServiceProcess) -> subprocess.Popen[bytes]:
    handle: subprocess.Popen[bytes] | None = process._proc  # the test signals the process itself
    if handle is None:
        raise RuntimeError("not started")
    return handle


async def read_stream(client: openai.AsyncOpenAI, started: asyncio.Event, counter: list[int]) -> tuple[float, str, str]:
    """Stream one answer (the SDK raises on an error object in the stream); (when it ended, text, finish reason)."""
    stream = await client.chat.completions.create(
        model="sot:test", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    text, finish, counted = "", "", False
    async for chunk in stream:
        if not chunk.choices:
            continue
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        if text and not counted:
            counted = True
            counter[0] += 1
            if counter[0] == STREAMS:
                started.set()
    return time.monotonic(), text, finish


def status(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str | None]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(request, timeout=5) as response:
            return response.status, response.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def wait_until(predicate: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


async def streams_across_sigterm(root: str, process: subprocess.Popen[bytes]) -> tuple[float, list[Any]]:
    """Start the streams, SIGTERM once all have content, probe the server while it drains; (signal time, ends)."""
    started, counter = asyncio.Event(), [0]
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0, timeout=60) as client:
        tasks = [asyncio.create_task(read_stream(client, started, counter)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 30)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: status(root + "/ready")[0] == 503, 5)
        question = json.dumps({"model": "sot:test", "messages": [{"role": "user", "content": QUESTION}]}).encode()
        probes = [await asyncio.to_thread(status, root + "/v1/chat/completions", "POST", question) for _ in range(3)]
        health = await asyncio.to_thread(status, root + "/health")
        unfinished = sum(not task.done() for task in tasks)
        ends = await asyncio.gather(*tasks, return_exceptions=True)
    assert unfinished > 0, "the answers ended before the probes: the test proves nothing"
    assert probes == [(503, "1")] * 3  # new questions are turned away, with Retry-After
    assert health[0] == 200
    return signalled, ends


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_streams_in_flight_finish_then_exits_0(workers: int) -> None:
    with running_upstream(**UPSTREAM) as upstream:
        command = serve_command(backend="openai", base_url=upstream, model="test", workers=workers, drain_seconds=DRAIN)
        service = ServiceProcess(command, name="serve")
        try:
            root = service.start().rstrip("/")
            process = popen(service)
            signalled, ends = asyncio.run(streams_across_sigterm(root, process))
            assert process.wait(timeout=DRAIN + 10) == 0
            exited = time.monotonic()
        finally:
            service.stop()
        for end in ends:
            assert not isinstance(end, BaseException), end
            finished, text, finish = end
            assert finished < signalled + DRAIN
            assert finish == "stop" and text.count("\n") == 2  # the three points, whole
        assert exited < signalled + DRAIN + 5
        stats = get_stats(upstream)
        assert stats["active"] == 0 and stats["cancelled"] == 0 and stats["failed"] == 0
        assert stats["started"] == stats["finished"] == STREAMS * 4  # each: the skeleton and 3 points


def test_a_drain_time_shorter_than_the_answers_cancels_them() -> None:
    with running_upstream(**UPSTREAM) as upstream:
        command = serve_command(backend="openai", base_url=upstream, model="test", drain_seconds=0.5)
        service = ServiceProcess(command, name="serve")
        try:
            root = service.start().rstrip("/")
            process = popen(service)

            async def one() -> BaseException | None:
                started, counter = asyncio.Event(), [STREAMS - 1]
                async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0) as client:
                    task = asyncio.create_task(read_stream(client, started, counter))
                    await asyncio.wait_for(started.wait(), 30)
                    process.send_signal(signal.SIGTERM)
                    return (await asyncio.gather(task, return_exceptions=True))[0]  # type: ignore[no-any-return]

            error = asyncio.run(one())
            assert process.wait(timeout=10) == 0
        finally:
            service.stop()
        # The stream ends with an error object, not a silent cut.
        assert isinstance(error, openai.APIError) and "shut down" in error.message
        stats = get_stats(upstream)
        assert stats["active"] == 0 and stats["cancelled"] > 0
