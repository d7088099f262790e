"""Bad input and a broken upstream through `sot serve` as a real process: a clear 400 or 502 at once, in every
mode, and nothing left in flight afterwards."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from sot.testing.process import ServiceProcess, serve_command, upstream_command

MODES = ("normal", "sot", "auto")
# JSON text with the escape written out: it parses to a Python string holding a lone surrogate.
SURROGATE_BODY = (
    '{"model": "%s:test", "stream": %s, "messages": [{"role": "user", "content": "bad \\ud800 surrogate?"}]}'
)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """`sot serve` in front of a healthy upstream, and another in front of one that sends malformed chunks."""
    processes: list[ServiceProcess] = []
    urls: dict[str, str] = {}
    try:
        for name, fault in (("healthy", None), ("malformed", "malformed-json")):
            options: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 2000}
            if fault:
                options["fault"] = fault
            upstream = ServiceProcess(upstream_command(**options), name=f"upstream-{name}")
            processes.append(upstream)
            base = upstream.start()
            serve = ServiceProcess(
                serve_command(backend="openai", base_url=base, model="test", max_attempts=1), name=f"serve-{name}"
            )
            processes.append(serve)
            urls[name] = serve.start().rstrip("/")
        yield urls
    finally:
        for process in reversed(processes):
            process.stop()


def post(url: str, body: str) -> tuple[int, dict[str, Any] | str]:
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            return response.status, text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def in_flight(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return int(json.loads(response.read())["in_flight"])


@pytest.mark.parametrize("stream", ["false", "true"])
@pytest.mark.parametrize("mode", MODES)
def test_a_lone_surrogate_is_a_400_before_any_upstream_request(servers: dict[str, str], mode: str, stream: str) -> None:
    started = time.perf_counter()
    status, body = post(servers["healthy"], SURROGATE_BODY % (mode, stream))
    assert time.perf_counter() - started < 2.0
    assert status == 400, body
    assert isinstance(body, dict) and "surrogate" in body["error"]["message"]


@pytest.mark.parametrize("mode", MODES)
def test_malformed_upstream_chunks_are_a_502_at_once(servers: dict[str, str], mode: str) -> None:
    body = json.dumps({"model": f"{mode}:test", "messages": [{"role": "user", "content": "How can I sleep better?"}]})
    started = time.perf_counter()
    status, answer = post(servers["malformed"], body)
    assert time.perf_counter() - started < 5.0
    assert status == 502, answer
    assert isinstance(answer, dict) and "malformed" in json.dumps(answer)


def test_64_bad_requests_in_a_row_leave_nothing_in_flight(servers: dict[str, str]) -> None:
    for i in range(64):
        mode = MODES[i % 3]
        if i % 2:
            status, _ = post(servers["healthy"], SURROGATE_BODY % (mode, "true"))
            assert status == 400
            assert in_flight(servers["healthy"]) == 0
        else:
            body = json.dumps({"model": f"{mode}:test", "messages": [{"role": "user", "content": "Why sleep?"}]})
            status, _ = post(servers["malformed"], body)
            assert status == 502
    deadline = time.monotonic() + 5
    while in_flight(servers["malformed"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(servers["healthy"]) == 0 and in_flight(servers["malformed"]) == 0
