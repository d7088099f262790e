"""The anthropic backend: its request body, and the engine through the real `anthropic` client against the test
upstream's Messages API (a separate process): prefills, prompt-cache reads, faults, `sot ask` and `sot bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("anthropic")

from sot.backends.anthropic import AnthropicBackend, retry_after
from sot.backends.anthropic_messages import build_messages_body
from sot.backends.base import GenerationRequest, Message, SamplingParams
from sot.engine import Engine, EngineConfig, RetryPolicy
from sot.errors import (
    AuthenticationError,
    BackendError,
    BackendStreamError,
    BadRequestError,
    RateLimitError,
)
from upstream_helpers import async_get_requests, async_wait_for_stats, get_requests

QUESTION = "What are the most effective ways to deal with stress?"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_engine(base_url: str, *, backend_options: dict[str, Any] | None = None, **config: Any) -> Engine:
    backend = AnthropicBackend("claude-test", base_url=base_url, api_key="test", **(backend_options or {}))
    return Engine(backend, EngineConfig(**config))


async def stream_all(backend: AnthropicBackend, request: GenerationRequest) -> str:
    text = ""
    async for chunk in backend.stream(request):
        text += chunk.text
    return text


def words(text: str | None) -> int:
    return len((text or "").split())


# -- the request body ---------------------------------------------------------------------------------------


def test_body_prefill_system_breakpoints_and_stops() -> None:
    request = GenerationRequest(
        messages=(
            Message("system", "Be brief."),
            Message("user", "Q1"),
            Message("assistant", "A1"),
            Message("user", "Q2"),
        ),
        sampling=SamplingParams(max_tokens=50),
        prefill="1. Sleep well:\n ",
        stop=("\n\n", "END"),
    )
    body = build_messages_body(request, model="m")
    kwargs = body.kwargs
    assert kwargs["system"] == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    roles = [m["role"] for m in kwargs["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert kwargs["messages"][0]["content"] == "Q1"  # only the last two turns and the system are breakpoints
    assert kwargs["messages"][1]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert kwargs["messages"][2]["content"][0]["text"] == "Q2"
    assert kwargs["messages"][3]["content"] == "1. Sleep well:"  # no trailing whitespace in the final turn
    assert body.stripped == "\n "
    assert kwargs["stop_sequences"] == ["END"] and body.client_stops == ("\n\n",)
    assert kwargs["max_tokens"] == 50 and "temperature" not in kwargs
    plain = build_messages_body(request, model="m", prompt_cache=False, prefill=False, sampling=True).kwargs
    assert plain["system"] == "Be brief." and plain["messages"][-1] == {"role": "user", "content": "Q2"}
    assert plain["extra_body"] == {"temperature": 0.0}


def test_retry_after_headers() -> None:
    assert retry_after({"retry-after": "1.5"}) == 1.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert retry_after({}) is None


# -- through the real client against the upstream -------------------------------------------------------------


async def test_sot_answers_with_the_right_prefills(upstream: str) -> None:
    engine = make_engine(upstream)
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "sot" and result.complete and len(result.points) == 5
    lines = result.answer.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [f"{i}. {p}" for i, p in enumerate(result.points, 1)]
    records = await async_get_requests(upstream, api="messages")
    skeleton = [r for r in records if r["kind"] == "skeleton"]
    points = sorted((r for r in records if r["kind"] == "point"), key=lambda r: r["prefill"])
    assert [r["prefill"] for r in skeleton] == ["1."]
    assert [r["prefill"] for r in points] == [f"{i}. {p}:" for i, p in enumerate(result.points, 1)]
    assert all(r["finish_reason"] == "stop" for r in points)


async def test_points_read_the_shared_prefix_from_the_cache(upstream: str) -> None:
    engine = make_engine(upstream)
    result = await engine.run(QUESTION, "sot")
    records = await async_get_requests(upstream, api="messages")
    skeleton = next(r for r in records if r["kind"] == "skeleton")
    points = sorted((r for r in records if r["kind"] == "point"), key=lambda r: r["started_monotonic"])
    assert len(points) == 5 and skeleton["cache_read_input_tokens"] == 0
    # The first point reads the skeleton request's prompt (all but its "1." prefill) and writes the skeleton.
    assert points[0]["cache_read_input_tokens"] == skeleton["prompt_tokens"] - words(skeleton["prefill"])
    shared = points[1]["prompt_tokens"] - words(points[1]["last_user"]) - words(points[1]["prefill"])
    for point in points[1:]:  # every later point reads all it shares with the others and adds only its tail
        tail, prefill = words(point["last_user"]), words(point["prefill"])
        assert point["cache_read_input_tokens"] == point["prompt_tokens"] - tail - prefill == shared
        assert point["cache_creation_input_tokens"] == tail and point["input_tokens"] == prefill
    counters = result.stats.backend
    assert counters["cache_read_input_tokens"] == sum(r["cache_read_input_tokens"] for r in records)
    assert counters["cache_creation_input_tokens"] == sum(r["cache_creation_input_tokens"] for r in records)
    assert counters["requests"] == len(records) == 6
    assert result.stats.computed_prompt_tokens is not None
    assert result.stats.computed_prompt_tokens < result.stats.prompt_tokens / 2
    # The next question's skeleton reads the fixed part (system prompt and few-shot turns) from the cache.
    await engine.run("How can I improve my time management skills?", "sot")
    await engine.backend.aclose()
    second = [r for r in await async_get_requests(upstream, kind="skeleton")][-1]
    assert 0 < second["cache_read_input_tokens"] < second["prompt_tokens"]


async def test_without_prompt_caching_nothing_is_read(upstream: str) -> None:
    engine = make_engine(upstream, backend_options={"prompt_cache": False})
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "sot"
    records = await async_get_requests(upstream, api="messages")
    assert all(r["cache_read_input_tokens"] == r["cache_creation_input_tokens"] == 0 for r in records)
    assert result.stats.backend["cache_read_input_tokens"] == 0


@pytest.mark.parametrize(("fault", "retry_after_seconds"), [("429", 1.0), ("529", 0.5)])
async def test_rate_limit_and_overload_are_retried_honouring_retry_after(
    upstream_factory: Callable[..., str], fault: str, retry_after_seconds: float
) -> None:
    base_url = upstream_factory(
        ttft=0.01,
        tokens_per_second=500,
        fault=fault,
        fault_kind="point",
        fault_first=1,
        retry_after=retry_after_seconds,
    )
    engine = make_engine(base_url)
    started = time.perf_counter()
    result = await engine.run(QUESTION, "sot")
    elapsed = time.perf_counter() - started
    await engine.backend.aclose()
    assert result.mode_used == "sot" and result.complete and result.fallback_reason is None
    assert retry_after_seconds - 0.1 < elapsed < retry_after_seconds + 4.0
    assert sorted(p.attempts for p in result.stats.points)[-1] == 2 and result.stats.retries == 1
    refused = [r for r in get_requests(base_url) if r["fault"] == fault]
    assert len(refused) == 1 and refused[0]["http_status"] == int(fault)


@pytest.mark.parametrize(("fault", "status"), [("429", 429), ("529", 529)])
async def test_refusals_map_to_rate_limit_errors_with_retry_after(upstream: str, fault: str, status: int) -> None:
    backend = _with_fault(AnthropicBackend("claude-test", base_url=upstream, api_key="test"), fault)
    request = GenerationRequest(messages=(Message("user", QUESTION),))
    with pytest.raises(RateLimitError) as caught:
        await stream_all(backend, request)
    await backend.aclose()
    assert caught.value.status_code == status and caught.value.retry_after is not None


async def test_bad_credentials_are_not_retried(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(fault="401")
    engine = make_engine(base_url)
    with pytest.raises(AuthenticationError, match="401"):
        await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert len(get_requests(base_url)) == 1


@pytest.mark.parametrize(
    ("fault", "message"),
    [("error-mid-stream", "overloaded_error"), ("malformed-json", "malformed"), ("no-finish", "stop reason")],
)
async def test_broken_streams_are_stream_errors(upstream: str, fault: str, message: str) -> None:
    backend = AnthropicBackend("claude-test", base_url=upstream, api_key="test")
    request = GenerationRequest(messages=(Message("user", QUESTION),))
    with pytest.raises(BackendStreamError, match=message):
        await stream_all(_with_fault(backend, fault), request)
    await backend.aclose()


def _with_fault(backend: AnthropicBackend, fault: str) -> AnthropicBackend:
    backend.client = backend.client.with_options(default_headers={"X-Test-Fault": fault})
    return backend


async def test_a_point_that_breaks_mid_stream_is_retried(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(
        ttft=0.01, tokens_per_second=500, fault="error-mid-stream", fault_kind="point", fault_first=1, fault_after=0
    )
    engine = make_engine(base_url, retry=RetryPolicy(base_delay=0.01, max_delay=0.05))
    result = await engine.run(QUESTION, "sot")
    await engine.backend.aclose()
    assert result.mode_used == "sot" and result.complete and result.stats.retries == 1
    assert (await async_wait_for_stats(base_url, lambda s: s["active"] == 0))["faulted"] == 1


async def test_the_upstream_refuses_what_anthropic_refuses(upstream: str) -> None:
    backend = AnthropicBackend("claude-test", base_url=upstream, api_key="test", prefill=True)
    body = build_messages_body(GenerationRequest(messages=(Message("user", "Hi"),), stop=("\n\n",)), model="m")
    body.kwargs["stop_sequences"] = ["\n\n"]  # what the backend never sends: the API refuses it
    with pytest.raises(Exception) as caught:
        async with backend.client.messages.with_streaming_response.create(**body.kwargs):
            pass
    assert "non-whitespace" in str(caught.value)
    text = await stream_all(backend, GenerationRequest(messages=(Message("user", QUESTION),), prefill="Well, "))
    assert text and not text[0].isspace()  # "Well," was sent; the reply's leading space was dropped
    await backend.aclose()


async def test_whitespace_stops_cut_the_stream_client_side(upstream: str) -> None:
    backend = AnthropicBackend("claude-test", base_url=upstream, api_key="test")
    messages = (Message("system", "Write only a skeleton."), Message("user", QUESTION))
    chunks = [c async for c in backend.stream(GenerationRequest(messages=messages, prefill="1.", stop=("\n",)))]
    await backend.aclose()
    assert "".join(c.text for c in chunks) == " Point one about effective"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    [record] = await async_get_requests(upstream, api="messages")
    assert record["kind"] == "skeleton" and record["http_status"] == 200  # "\\n" was not sent: a 400 otherwise


async def test_a_wrong_model_answer_is_a_bad_request_not_retried(upstream: str) -> None:
    backend = AnthropicBackend("claude-test", base_url=upstream, api_key="test")
    request = GenerationRequest(messages=(Message("user", "Hi"),))
    backend.client = backend.client.with_options(default_headers={"anthropic-version": ""})
    with pytest.raises(BadRequestError, match="anthropic-version"):
        await stream_all(backend, request)
    await backend.aclose()
    with pytest.raises(BackendError):
        await stream_all(AnthropicBackend("claude-test", base_url="http://127.0.0.1:9", api_key="x"), request)


# -- the command line -----------------------------------------------------------------------------------------


def run_sot(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sot", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_sot_ask_with_the_anthropic_backend(upstream: str) -> None:
    done = run_sot("ask", "-b", "anthropic", "--base-url", upstream, "-m", "claude-test", "--json", QUESTION)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mode_used"] == "sot" and result["backend"] == "anthropic" and len(result["points"]) == 5
    assert result["stats"]["backend"]["cache_read_input_tokens"] > 0


def test_no_key_is_a_config_error_and_the_openai_key_is_not_sent_to_anthropic(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(OPENAI_API_KEY="sk-openai-not-for-anthropic", ANTHROPIC_CONFIG_DIR=str(tmp_path))
    command = [sys.executable, "-m", "sot", "ask", "-b", "anthropic", "-m", "claude-test", "hi"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)
    # A ConfigError before any request (exit 2): with the OpenAI key, the client would have tried Anthropic's API.
    assert done.returncode == 2 and "ANTHROPIC_API_KEY" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not (SHARED / "data" / "vicuna80.jsonl").exists(), reason="../shared is not present")
def test_sot_bench_with_the_anthropic_backend(upstream_factory: Callable[..., str], tmp_path: Path) -> None:
    base_url = upstream_factory(ttft=0.05, tokens_per_second=150)
    output = tmp_path / "bench.json"
    dataset = str(SHARED / "data" / "vicuna80.jsonl")
    args = ("-b", "anthropic", "--base-url", base_url, "-m", "claude-test", "--limit", "3", "--output", str(output))
    done = run_sot("bench", "--dataset", dataset, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    payload = json.loads(output.read_text())
    assert len(payload["rows"]) == 3 and "parallel efficiency, median" in done.stdout
    assert all(row["points"] == 5 and row["sot_fallback"] is None for row in payload["rows"])
    assert payload["summary"]["speedup_median"] > 1.3
    assert payload["summary"]["parallel_efficiency_median"] >= 0.9
    assert {r["api"] for r in get_requests(base_url)} == {"messages"}


async def test_sot_serve_with_the_anthropic_backend(upstream: str) -> None:
    import openai

    from sot.testing.process import ServiceProcess, serve_command

    command = serve_command(backend="anthropic", base_url=upstream, model="claude-test", api_key="test")
    with ServiceProcess(command, name="serve-anthropic") as serve:
        client = openai.AsyncOpenAI(base_url=serve.root_url + "/v1", api_key="none", max_retries=0)
        completion = await client.chat.completions.create(
            model="sot:claude-test", messages=[{"role": "user", "content": QUESTION}]
        )
        await client.close()
    answer = completion.choices[0].message.content or ""
    assert [line.split(".", 1)[0] for line in answer.splitlines()] == ["1", "2", "3", "4", "5"]
    records = await async_get_requests(upstream, api="messages")
    assert len(records) == 6 and sum(r["cache_read_input_tokens"] for r in records) > 0
