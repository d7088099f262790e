"""`sot serve --metrics --access-log-json` as a real process in front of the test upstream: after a scripted mix of
SoT, fallback, normal, rejected and invalid requests, /metrics counts exactly what was sent (counters and
histogram counts), the access log has one line per request with its id, modes, fallback and upstream
requests, and the request ids reach the upstream. /metrics is behind the API key."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sot.testing.process import ServiceProcess, serve_command, upstream_command
from upstream_helpers import get_requests, get_stats

KEY = "metrics-test-key"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The first two skeletons fail (500, not retried with --max-attempts 1): those SoT questions fall back. Normal
# answers take about 0.6 s, long enough to hold the one slot (--max-concurrency 1) while others are refused.
UPSTREAM: dict[str, Any] = {
    "ttft": 0.01,
    "tokens_per_second": 300,
    "tokens_per_answer": 10,
    "full_answer_factor": 18,
    "skeleton_points": 3,
    "fault": "500",
    "fault_kind": "skeleton",
    "fault_first": 2,
}
QUESTION = [{"role": "user", "content": "What are some tips for staying healthy?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(sot serve's base URL, the upstream's base URL, the access log's path)."""
    log = tmp_path_factory.mktemp("access") / "access.jsonl"
    with ServiceProcess(upstream_command(**UPSTREAM), name="upstream") as upstream:
        command = serve_command(
            backend="openai",
            base_url=upstream.url,
            model="test",
            metrics=True,
            server_api_key=KEY,
            max_concurrency=1,
            max_attempts=1,
            access_log_json=str(log),
        )
        with ServiceProcess(command, name="serve") as serve:
            yield serve.url.rstrip("/") + "/v1", upstream.url, log


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def scrape(base_url: str, key: str | None = KEY) -> str:
    request = urllib.request.Request(base_url.removesuffix("/v1") + "/metrics")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    with OPENER.open(request, timeout=10) as response:
        return str(response.read().decode())


async def stream_answer(client: openai.AsyncOpenAI, held: asyncio.Event | None = None, **options: Any) -> Any:
    """A streamed answer's usage and `sot` object; sets `held` at its first content."""
    stream = await client.chat.completions.create(
        messages=QUESTION, stream=True, stream_options={"include_usage": True}, **options
    )
    usage, sot = None, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and held is not None:
            held.set()
        usage = chunk.usage or usage
        sot = getattr(chunk, "sot", None) or sot
    return usage, sot


async def refused(client: openai.AsyncOpenAI) -> int:
    try:
        await client.chat.completions.create(model="normal:test", messages=QUESTION)  # type: ignore[arg-type]
    except openai.RateLimitError as exc:
        if exc.response.headers.get("retry-after") is None:
            raise
        return 1
    return 0


async def scripted_mix(base_url: str) -> list[tuple[Any, Any]]:
    """2 fallbacks, 3 SoT answers (one streamed), 2 normal answers, then a streamed normal answer during which
    3 requests are refused, then one invalid request. Returns (usage, sot) of every answer."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=30)
    answers: list[tuple[Any, Any]] = []
    try:
        for i, model in enumerate(["sot:test"] * 2 + ["sot:test"] * 2 + ["normal:test"] * 2):
            headers = {"X-Request-ID": f"mix-{i}"}
            completion = await client.chat.completions.create(model=model, messages=QUESTION, extra_headers=headers)  # type: ignore[arg-type]
            answers.append((completion.usage, getattr(completion, "sot", None)))
        answers.append(await stream_answer(client, model="sot:test"))
        held = asyncio.Event()
        holder = asyncio.create_task(stream_answer(client, held, model="normal:test"))
        await asyncio.wait_for(held.wait(), 10)
        rejected = await asyncio.gather(*(refused(client) for _ in range(3)))
        answers.append(await holder)
        assert rejected == [1, 1, 1]
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="fastest:test", messages=QUESTION)  # type: ignore[arg-type]
    finally:
        await client.close()
    return answers


def test_metrics_count_what_was_sent(server: tuple[str, str, Path]) -> None:
    base_url, upstream, _log = server
    answers = asyncio.run(scripted_mix(base_url))
    page = samples(scrape(base_url))

    def requests(requested: str, used: str, outcome: str) -> float:
        return value(page, "sot_requests_total", mode_requested=requested, mode_used=used, outcome=outcome)

    assert requests("sot", "normal", "ok") == 2  # the fallbacks
    assert requests("sot", "sot", "ok") == 3
    assert requests("normal", "normal", "ok") == 3
    assert requests("normal", "none", "rejected") == 3
    assert requests("unknown", "none", "invalid") == 1
    assert sum(v for (name, _), v in page.items() if name == "sot_requests_total") == 12
    assert value(page, "sot_fallbacks_total", reason="skeleton_failed") == 2
    assert value(page, "sot_rejected_requests_total", reason="overloaded") == 3
    assert value(page, "sot_in_flight_requests") == 0
    upstream_requests = [sot["stats"]["requests"] for _, sot in answers]
    # A fallback: the failed skeleton and the normal answer; SoT: the skeleton and 3 points; normal: one.
    assert sorted(upstream_requests) == [1, 1, 1, 2, 2, 4, 4, 4]
    assert value(page, "sot_upstream_requests_per_question_count") == 8
    assert value(page, "sot_upstream_requests_per_question_sum") == sum(upstream_requests) == 19
    assert get_stats(upstream)["started"] == 19
    assert value(page, "sot_upstream_requests_per_question_bucket", le="2.0") == 5
    for name, count in [
        ("sot_time_to_first_token_seconds", 8),
        ("sot_first_answer_seconds", 8),
        ("sot_total_seconds", 8),
        ("sot_skeleton_seconds", 3),  # the failed skeletons have no time
        ("sot_slowest_point_seconds", 3),
        ("sot_points_per_question", 3),
    ]:
        assert value(page, f"{name}_count") == count, name
        assert value(page, f"{name}_bucket", le="+Inf") == count, name
    assert value(page, "sot_points_per_question_sum") == 9
    assert value(page, "sot_tokens_total", kind="completion") == sum(u.completion_tokens for u, _ in answers)
    assert value(page, "sot_tokens_total", kind="prompt") == sum(u.prompt_tokens for u, _ in answers)


def test_metrics_need_the_api_key(server: tuple[str, str, Path]) -> None:
    base_url, _, _ = server
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(base_url, key=None)
    assert caught.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(base_url, key="wrong")
    assert caught.value.code == 401


def test_access_log_has_a_line_per_request_and_ids_reach_the_upstream(server: tuple[str, str, Path]) -> None:
    base_url, upstream, log = server
    if not any(json.loads(line)["path"] == "/v1/chat/completions" for line in log.read_text().splitlines()):
        asyncio.run(scripted_mix(base_url))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    chats = [line for line in lines if line["path"] == "/v1/chat/completions"]
    assert len(chats) == 12
    by_id = {line["request_id"]: line for line in chats}
    fallback, sot, normal = by_id["mix-0"], by_id["mix-2"], by_id["mix-4"]
    assert (fallback["mode_requested"], fallback["mode_used"], fallback["fallback_kind"]) == (
        "sot",
        "normal",
        "skeleton_failed",
    )
    assert fallback["fallback_reason"].startswith("the skeleton request failed")
    assert (fallback["upstream_requests"], fallback["status"], fallback["outcome"]) == (2, 200, "ok")
    assert (sot["mode_used"], sot["points"], sot["upstream_requests"], sot["stream"]) == ("sot", 3, 4, False)
    assert sot["skeleton_s"] > 0 and sot["slowest_point_s"] > 0 and sot["total_s"] >= sot["skeleton_s"]
    assert 0 < sot["first_answer_s"] <= sot["duration_s"]
    assert sot["completion_tokens"] > 0 and sot["routing_key"].startswith("sot-")
    assert (normal["mode_used"], normal["points"], normal["upstream_requests"]) == ("normal", None, 1)
    rejected = [line for line in chats if line["outcome"] == "rejected"]
    assert [(r["status"], r["rejected"]) for r in rejected] == [(429, "overloaded")] * 3
    assert [line["status"] for line in chats if line["outcome"] == "invalid"] == [400]
    forwarded = [r["headers"].get("x-request-id") for r in get_requests(upstream)]
    assert forwarded.count("mix-0") == 2 and forwarded.count("mix-2") == 4  # every request of the question
