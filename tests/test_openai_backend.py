"""The engine through the real `openai` client against the test upstream running as a separate process."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from sot.backends.openai_compat import OpenAIBackend
from sot.engine import Engine, EngineConfig
from sot.errors import AuthenticationError, BackendConnectionError, BackendStatusError
from sot.events import PointDelta
from upstream_helpers import async_get_stats, async_wait_for_stats

QUESTION = "What are the most effective ways to deal with stress?"


def make_engine(base_url: str, *, max_retries: int = 0, **config: Any) -> Engine:
    backend_options = {k: config.pop(k) for k in ("continue_final_message", "cache_key_field") if k in config}
    backend = OpenAIBackend("sot-test", base_url=base_url, api_key="test", max_retries=max_retries, **backend_options)
    return Engine(backend, EngineConfig(**config))


async def no_other_tasks() -> None:
    """Nothing the engine started is still running once a run has returned or raised."""
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def settled(base_url: str) -> dict[str, Any]:
    """The upstream's stats once nothing is active any more (cancelled streams take a moment to notice)."""
    return await async_wait_for_stats(base_url, lambda s: s["active"] == 0, seconds=5.0)


async def test_sot_latency_is_skeleton_plus_slowest_point(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.05, tokens_per_second=100, tokens_per_answer=30, skeleton_points=5)
    engine = make_engine(base_url)
    started = time.perf_counter()
    result = await engine.run(QUESTION, "sot")
    elapsed = time.perf_counter() - started
    await engine.backend.aclose()
    stats = result.stats
    assert result.mode_used == "sot" and result.complete and len(result.points) == 5
    point_sum = sum(p.seconds for p in stats.points)
    assert point_sum > 1.5  # five points of ~0.35 s each
    critical_path = stats.skeleton_seconds + stats.slowest_point_seconds
    assert elapsed == pytest.approx(critical_path, rel=0.1, abs=0.1)
    assert elapsed < stats.skeleton_seconds + point_sum / 2
    await no_other_tasks()


@pytest.mark.parametrize("continue_final_message", [False, True])
async def test_both_prompt_styles_give_complete_answers(upstream: str, continue_final_message: bool) -> None:
    engine = make_engine(upstream, continue_final_message=continue_final_message, cache_key_field="prompt_cache_key")
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "sot" and result.complete
    lines = result.answer.splitlines()
    assert [line.split(".", 1)[0] for line in lines] == [str(i) for i in range(1, len(result.points) + 1)]
    stats = await async_get_stats(upstream)
    points = [r for r in stats["requests"] if r["kind"] == "point"]
    assert len(points) == len(result.points)
    assert len({r["prompt_cache_key"] for r in points}) == 1 and points[0]["prompt_cache_key"].startswith("sot-")


async def test_normal_mode_and_usage(upstream: str) -> None:
    engine = make_engine(upstream)
    result = await engine.run(QUESTION, "normal")
    await engine.backend.aclose()
    assert result.mode_used == "normal" and result.complete and result.answer
    assert result.stats.prompt_tokens > 0 and result.stats.completion_tokens == len(result.stats.token_times)


FAULTS_RECOVERED_BY_RETRY = ["500", "cut", "error-mid-stream", "stall"]


@pytest.mark.parametrize("fault", FAULTS_RECOVERED_BY_RETRY)
async def test_a_faulty_point_is_retried_into_a_complete_answer(
    upstream_factory: Callable[..., str], fault: str
) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=500, fault=fault, fault_kind="point", fault_first=1)
    engine = make_engine(base_url, point_deadline=1.0)
    started = time.perf_counter()
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert time.perf_counter() - started < 5.0
    assert result.complete
    if result.mode_used == "sot":  # retried: nothing of the faulty point had reached the answer yet
        assert result.fallback_reason is None and sorted(p.attempts for p in result.stats.points)[-1] == 2
    else:  # the faulty point was being sent live: normal decoding continued the answer instead
        assert result.fallback_reason is not None and result.fallback_reason.startswith("point ")
        assert fault != "500"  # a refusal before any text is always retried
    assert (await settled(base_url))["active"] == 0
    await no_other_tasks()


async def test_rate_limit_is_retried_by_the_engine_honouring_retry_after(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=500, fault="429", fault_kind="point", fault_first=1)
    engine = make_engine(base_url)
    started = time.perf_counter()
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "sot" and result.complete
    assert 0.9 < time.perf_counter() - started < 5.0  # the upstream said Retry-After: 1
    await no_other_tasks()


@pytest.mark.parametrize("fault", ["500", "stall", "cut"])
async def test_points_that_keep_failing_fall_back_to_a_complete_normal_answer(
    upstream_factory: Callable[..., str], fault: str
) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=500, fault=fault, fault_kind="point")
    engine = make_engine(base_url, point_deadline=1.0)
    started = time.perf_counter()
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert time.perf_counter() - started < 5.0  # a deadline, the retries the budget allows, then the fallback
    assert result.mode_used == "normal" and result.complete and result.answer
    assert result.fallback_reason is not None and re.match(r"point \d failed after \d attempt", result.fallback_reason)
    assert result.stats.retries <= engine.config.retry.budget
    assert (await settled(base_url))["active"] == 0
    await no_other_tasks()


async def test_a_failing_skeleton_falls_back(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=500, fault="error-mid-stream", fault_kind="skeleton")
    engine = make_engine(base_url)
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "normal" and result.complete
    assert "skeleton request failed" in (result.fallback_reason or "")


async def test_an_upstream_that_always_fails_gives_a_clear_error(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(fault="500")
    engine = make_engine(base_url)
    with pytest.raises(BackendStatusError, match="upstream answered 500"):
        await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    await no_other_tasks()


async def test_bad_credentials_are_not_retried_or_hidden(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(fault="401")
    engine = make_engine(base_url)
    with pytest.raises(AuthenticationError):
        await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert (await async_get_stats(base_url))["started"] == 1


async def test_wrong_base_url_is_a_connection_error() -> None:
    engine = make_engine("http://127.0.0.1:9/v1")
    with pytest.raises(BackendConnectionError, match="could not reach"):
        await engine.run(QUESTION, "sot")
    await engine.backend.aclose()


async def test_a_consumer_that_leaves_cancels_the_upstream_requests(upstream_factory: Callable[..., str]) -> None:
    # 0.3 s to the first token: every point request has reached the upstream before point 1's first text,
    # even on a loaded machine (a request cancelled before it was sent never shows upstream).
    base_url = upstream_factory(ttft=0.3, tokens_per_second=20, tokens_per_answer=100)
    engine = make_engine(base_url)
    events = engine.stream(QUESTION, "sot")
    async for event in events:
        if isinstance(event, PointDelta):
            break
    await events.aclose()
    stats = await settled(base_url)
    assert stats["cancelled"] >= 4  # the points still streaming when we left
    await engine.backend.aclose()
    await no_other_tasks()


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sot", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_against_the_upstream_json_and_stdin(upstream: str) -> None:
    done = run_cli("ask", "--backend", "openai", "--base-url", upstream, "--model", "m", "--json", stdin=QUESTION)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mode_used"] == "sot" and result["complete"] and len(result["points"]) == 5


def test_cli_plain_output_when_not_a_terminal(upstream: str) -> None:
    done = run_cli("ask", "--backend", "openai", "--base-url", upstream, "--model", "m", "--mode", "normal", QUESTION)
    assert done.returncode == 0 and done.stdout.strip() and "\x1b[" not in done.stdout
    assert "mode normal" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ask", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "hi"],
            "could not reach",
        ),
        (["ask", "--backend", "nope", "hi"], "'nope' is not one of"),
        (["ask", "--backend", "openai", "hi"], "needs --model"),
        (["ask", "--backend", "scripted", ""], "the question is empty"),
        (["ask", "--backend", "scripted", "--prompts", "/nonexistent.json", "hi"], "neither a built-in set"),
    ],
)
def test_cli_bad_input_gives_one_clear_line_not_a_traceback(args: list[str], message: str) -> None:
    done = run_cli(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_huge_and_brace_questions() -> None:
    huge = run_cli("ask", "--backend", "scripted", stdin="x" * 150_000)
    assert huge.returncode == 1
    assert "limit" in huge.stderr and "Traceback" not in huge.stderr
    braces = run_cli("ask", "--backend", "scripted", "What is {x}?\n1. {point}\n2. {question}")
    assert braces.returncode == 0 and "1. First idea" in braces.stdout


async def test_the_request_body_is_plain_json_with_extra_fields_merged(upstream: str) -> None:
    backend = OpenAIBackend("sot-test", base_url=upstream, api_key="test", extra_body={"repetition_penalty": 1.1})
    engine = Engine(backend, EngineConfig())
    await engine.run(QUESTION, "normal", session="conversation-7")
    await backend.aclose()
    record = (await settled(upstream))["requests"][-1]
    assert record["headers"].get("x-sot-session") == "conversation-7"  # the routing key, as a header
    assert record["kind"] == "full"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_one_engine_answers_from_one_event_loop_after_another(
    upstream: str, transport: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """`run_sync` twice, then `asyncio.run` twice: the backend's HTTP client follows the running loop (its
    connections belong to the loop that opened them), with no error and no report of unclosed connections."""
    backend = OpenAIBackend("sot-test", base_url=upstream, api_key="test", transport=transport)
    engine = Engine(backend, EngineConfig())
    answers = [engine.run_sync(QUESTION, "sot").answer for _ in range(2)]
    answers += [asyncio.run(engine.run(QUESTION, "normal")).answer for _ in range(2)]
    asyncio.run(backend.aclose())
    assert all(answers) and answers[0] == answers[1] and answers[2] == answers[3]
    assert "Unclosed" not in capfd.readouterr().err


def test_an_unknown_transport_is_a_config_error() -> None:
    from sot.errors import ConfigError

    with pytest.raises(ConfigError, match="transport"):
        OpenAIBackend("sot-test", base_url="http://127.0.0.1:9/v1", transport="carrier-pigeon")


async def _raw_upstream(reply: bytes | None, reset: bool = False) -> asyncio.Server:
    """A TCP server on 127.0.0.1 that reads a request and answers `reply` raw (None: closes at once; `reset`:
    closes with a TCP reset), for what the test upstream cannot do: break HTTP itself."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif reply is not None:
            writer.write(reply)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("reply", "reset", "words"),
    [
        (b"HELLO THERE\r\n\r\n", False, ""),  # not HTTP at all
        (None, False, "disconnect"),  # closed without a response
        (None, True, "reset"),  # connection reset
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\ndata: x\r\n", False, "chunk"),  # bad chunking
    ],
    ids=["garbage", "closed", "reset", "bad-chunked"],
)
async def test_broken_http_is_a_connection_error_that_says_why(
    transport: str, reply: bytes | None, reset: bool, words: str
) -> None:
    server = await _raw_upstream(reply, reset)
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", transport=transport)
    engine = Engine(backend, EngineConfig(run_deadline=10))
    started = time.monotonic()
    try:
        with pytest.raises(BackendConnectionError) as caught:
            await engine.run(QUESTION, "normal")
    finally:
        await backend.aclose()
        server.close()
    assert time.monotonic() - started < 10  # the retry policy's attempts, then a typed error
    if transport == "aiohttp":  # the transport's own words, not its error map's "timed out"
        assert "timed out" not in str(caught.value).lower() and words in str(caught.value).lower()
    await no_other_tasks()
