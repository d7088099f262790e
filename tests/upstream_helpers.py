"""Start `sot.testing.upstream` as a real subprocess on 127.0.0.1 for a test, and read its /stats.

Plain use::

    with running_upstream(ttft=0.01, tokens_per_second=500) as base_url:   # "http://127.0.0.1:PORT/v1"
        client = openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)

Options are the server's command-line flags with underscores (`fault="429"`, `fault_first=2`,
`access_log=True`); see `python -m sot.testing.upstream --help`.

Pytest use: load this module as a plugin, in a test module or in tests/conftest.py::

    pytest_plugins = ["upstream_helpers"]

- `upstream_server` (module scope): one fast server (`FAST_OPTIONS`) shared by a module's tests;
- `upstream` (function scope): that server's base URL, with its /stats reset before the test;
- `upstream_factory` (function scope): `upstream_factory(**options) -> base_url`, one new server per
  call, all stopped after the test.

PYTEST_DONT_REWRITE: test modules import this before pytest loads it as a plugin; without the marker
pytest warns that it cannot rewrite the asserts of an already imported module (there are none to rewrite).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from sot.testing.process import ServiceProcess, fetch_json, upstream_command

# Quick answers for functional tests; timing tests override ttft/tokens_per_second per request.
FAST_OPTIONS: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 2000}


class UpstreamProcess(ServiceProcess):
    """One `python -m sot.testing.upstream` subprocess; its output goes to a log file shown on failure."""

    def __init__(self, *, port: int = 0, startup_timeout: float = 20.0, **options: Any) -> None:
        super().__init__(upstream_command(port, **options), name="upstream", startup_timeout=startup_timeout)

    @property
    def base_url(self) -> str:
        """The base URL ("http://127.0.0.1:PORT/v1") once started."""
        return self.url


@contextmanager
def running_upstream(**options: Any) -> Iterator[str]:
    """A test upstream for the duration of the block; yields its base URL ("http://127.0.0.1:PORT/v1")."""
    with UpstreamProcess(**options) as process:
        yield process.base_url


def _root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def get_stats(base_url: str) -> dict[str, Any]:
    """The server's /stats: counters (started, finished, cancelled, failed, active, max_active, faulted)
    and `requests`, a record of each recent request (see `get_requests`)."""
    stats: dict[str, Any] = fetch_json(_root(base_url) + "/stats")
    return stats


def get_requests(base_url: str, **match: Any) -> list[dict[str, Any]]:
    """The per-request records of /stats (oldest first, the last 500), keeping those whose fields equal `match`:
    `get_requests(url, kind="point", outcome="cancelled")`. Fields are listed in `sot.testing.upstream`'s
    docstring; among them `started_monotonic`/`ended_monotonic` (comparable with this process's
    time.monotonic()), `fault`, `http_status`, `outcome`, `completion_tokens` and `headers` (lower-case names)."""
    records: list[dict[str, Any]] = get_stats(base_url)["requests"]
    return [r for r in records if all(r.get(key) == value for key, value in match.items())]


def reset_stats(base_url: str) -> None:
    """Forget all requests (also re-arms `fault_first`)."""
    fetch_json(_root(base_url) + "/stats/reset", method="POST")


def wait_for_stats(base_url: str, predicate: Callable[[dict[str, Any]], bool], seconds: float = 5.0) -> dict[str, Any]:
    """Poll /stats until `predicate` holds; AssertionError with the last stats on timeout."""
    deadline = time.monotonic() + seconds
    while True:
        stats = get_stats(base_url)
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats never satisfied the condition; last: {json.dumps(stats)[:2000]}")
        time.sleep(0.02)


async def async_get_stats(base_url: str) -> dict[str, Any]:
    """`get_stats` without blocking the event loop."""
    return await asyncio.to_thread(get_stats, base_url)


async def async_wait_for_stats(
    base_url: str, predicate: Callable[[dict[str, Any]], bool], seconds: float = 5.0
) -> dict[str, Any]:
    """`wait_for_stats` without blocking the event loop."""
    return await asyncio.to_thread(wait_for_stats, base_url, predicate, seconds)


async def async_get_requests(base_url: str, **match: Any) -> list[dict[str, Any]]:
    """`get_requests` without blocking the event loop."""
    return await asyncio.to_thread(lambda: get_requests(base_url, **match))


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[str]:
    """One fast test upstream shared by the tests of a module; yields its base URL."""
    with running_upstream(**FAST_OPTIONS) as base_url:
        yield base_url


@pytest.fixture
def upstream(upstream_server: str) -> str:
    """The shared test upstream's base URL, with /stats reset for this test."""
    reset_stats(upstream_server)
    return upstream_server


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., str]]:
    """`upstream_factory(**options) -> base_url`: a dedicated test upstream, stopped after the test."""
    processes: list[UpstreamProcess] = []

    def start(**options: Any) -> str:
        process = UpstreamProcess(**options)
        processes.append(process)
        return process.start()

    yield start
    for process in processes:
        process.stop()
