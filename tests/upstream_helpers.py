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
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
# Quick answers for functional tests; timing tests override ttft/tokens_per_second per request.
FAST_OPTIONS: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 2000}

_READY = re.compile(r"listening on (http://\S+)")
# Loopback only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _flags(options: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


class UpstreamProcess:
    """One `python -m sot.testing.upstream` subprocess; its output goes to a log file shown on failure."""

    def __init__(self, *, port: int = 0, startup_timeout: float = 20.0, **options: Any) -> None:
        self.command = [sys.executable, "-m", "sot.testing.upstream", "--port", str(port), *_flags(options)]
        self.startup_timeout = startup_timeout
        self.base_url = ""  # "http://127.0.0.1:PORT/v1"
        self.root_url = ""  # "http://127.0.0.1:PORT"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="sot-upstream-", suffix=".log", delete=False)  # noqa: SIM115

    def log_text(self) -> str:
        """Everything the server printed so far."""
        return Path(self._log.name).read_text(errors="replace")

    def start(self) -> str:
        """Start the server, wait until /health answers, and return the base URL."""
        env = dict(os.environ)
        # The working tree's package, whether or not `sot` is installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self._proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"test upstream exited with {self._proc.returncode}:\n{self.log_text()}")
            if not self.base_url:
                found = _READY.search(self.log_text())
                if found:
                    self.base_url = found.group(1)
                    self.root_url = self.base_url.removesuffix("/v1")
            if self.base_url:
                try:
                    with _OPENER.open(self.root_url + "/health", timeout=1) as response:
                        if response.status == 200:
                            return self.base_url
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"test upstream did not become healthy in {self.startup_timeout}s:\n{self.log_text()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its log."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> UpstreamProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def running_upstream(**options: Any) -> Iterator[str]:
    """A test upstream for the duration of the block; yields its base URL ("http://127.0.0.1:PORT/v1")."""
    with UpstreamProcess(**options) as process:
        yield process.base_url


def _root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def get_stats(base_url: str) -> dict[str, Any]:
    """The server's /stats: counters (started, finished, cancelled, failed, active, max_active, faulted)
    and `requests`, the recent requests with their timestamps and status."""
    with _OPENER.open(_root(base_url) + "/stats", timeout=5) as response:
        stats: dict[str, Any] = json.load(response)
        return stats


def reset_stats(base_url: str) -> None:
    """Forget all requests (also re-arms `fault_first`)."""
    request = urllib.request.Request(_root(base_url) + "/stats/reset", data=b"", method="POST")
    with _OPENER.open(request, timeout=5):
        pass


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
