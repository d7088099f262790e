"""`sot serve` decides a stream's status the way hosted APIs do, and sends one coherent answer: a refused
skeleton is the upstream's 429 (not a 200 with an error inside), a stalled skeleton still gets headers and
keep-alive comments, and a fallback after streamed points continues them into the same text a non-streamed
request gets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sot.testing.process import ServiceProcess, serve_command, upstream_command
from upstream_helpers import get_stats, reset_stats

QUESTION: list[Any] = [{"role": "user", "content": "What are some tips for staying healthy?"}]
UPSTREAMS: dict[str, dict[str, Any]] = {
    # every skeleton refused: 429 with Retry-After: 1
    "refusing": {"ttft": 0.01, "tokens_per_second": 2000, "fault": "429", "fault_kind": "skeleton", "retry_after": 1},
    # the skeleton never sends a token
    "stalling": {"ttft": 0.01, "tokens_per_second": 2000, "fault": "stall", "fault_kind": "skeleton"},
    # every point breaks with an error object after 3 tokens, when point 1's first tokens are already out
    "breaking": {
        "ttft": 0.01,
        "tokens_per_second": 50,
        "fault": "error-mid-stream",
        "fault_kind": "point",
        "fault_after": 3,
    },
}


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, tuple[str, str]]]:
    """name -> (`sot serve` base URL, its upstream's base URL)."""
    processes: list[ServiceProcess] = []
    urls: dict[str, tuple[str, str]] = {}
    try:
        for name, options in UPSTREAMS.items():
            upstream = ServiceProcess(upstream_command(**options), name=f"upstream-{name}")
            processes.append(upstream)
            upstream_url = upstream.start()
            command = serve_command(
                backend="openai", base_url=upstream_url, model="test", ping_seconds=0.3, stall_timeout=4
            )
            server = ServiceProcess(command, name=f"serve-{name}")
            processes.append(server)
            urls[name] = (server.start().rstrip("/") + "/v1", upstream_url)
        yield urls
    finally:
        for process in reversed(processes):
            process.stop()


def test_a_refused_skeleton_is_a_429_with_retry_after_in_sot_streaming(fleet: dict[str, tuple[str, str]]) -> None:
    server, upstream = fleet["refusing"]
    reset_stats(upstream)
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    for stream in (True, False):
        with pytest.raises(openai.RateLimitError) as caught:
            response = client.chat.completions.create(model="sot:test", messages=QUESTION, stream=stream)
            if stream:
                for _chunk in response:  # type: ignore[union-attr]
                    pass
        assert caught.value.status_code == 429
        assert caught.value.response.headers.get("retry-after") == "1"
    kinds = [r["kind"] for r in get_stats(upstream)["requests"]]
    assert kinds and set(kinds) == {"skeleton"}  # retried by the policy, never amplified into a fallback


async def _raw_stream(url: str, seconds: float) -> tuple[float, bytes, list[tuple[float, bytes]]]:
    """POST a streamed SoT request over a plain socket: (seconds to the headers, the headers, the body's lines
    with their arrival times) for `seconds`."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    body = b'{"model": "sot:test", "stream": true, "messages": [{"role": "user", "content": "Tips for sleep?"}]}'
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.perf_counter()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    headers_at = time.perf_counter() - started
    lines: list[tuple[float, bytes]] = []
    end = started + seconds
    try:
        while (left := end - time.perf_counter()) > 0:
            line = await asyncio.wait_for(reader.readline(), left)
            lines.append((time.perf_counter() - started, line))
    except TimeoutError:
        pass
    finally:
        writer.close()
    return headers_at, head, lines


async def test_a_stalled_skeleton_still_gets_headers_and_pings(fleet: dict[str, tuple[str, str]]) -> None:
    server, _upstream = fleet["stalling"]
    headers_at, head, lines = await _raw_stream(server, seconds=1.6)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert headers_at < 0.5  # at once: the upstream accepted the skeleton request
    pings = [t for t, line in lines if line.startswith(b":")]
    assert len(pings) >= 3  # every 0.3 s while the skeleton is stalled
    content = [line for _t, line in lines if b'"content":"' in line and b'"content":""' not in line]
    assert not content  # nothing but the role chunk and keep-alives yet


def test_a_fallback_after_streamed_points_continues_them_into_the_non_streamed_text(
    fleet: dict[str, tuple[str, str]],
) -> None:
    server, _upstream = fleet["breaking"]
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    whole = client.chat.completions.create(model="sot:test", messages=QUESTION)
    chunks = list(client.chat.completions.create(model="sot:test", messages=QUESTION, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sot = whole.to_dict()["sot"]
    assert sot["mode_used"] == "normal" and sot["fallback_reason"].startswith("point ")
    answer = whole.choices[0].message.content
    assert answer and answer.startswith("1. ")  # the fallback continued the points already sent
    assert streamed == answer
    assert answer.count("1. ") == 1  # one answer, not the points and then a second answer
