"""The supervisor of `sot serve --workers 2` as a real process: each worker accepts on its own socket of the
one port; a worker killed after its start is replaced, on its socket, and the server keeps answering (then
drains and exits 0); a worker that dies right after its start is a crash loop, which stops every worker and
exits 1 instead of restarting forever."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import openai
import pytest

from sot.server.workers import CRASH_LOOP_SECONDS
from sot.testing.process import ServiceProcess, child_processes, serve_command
from upstream_helpers import running_upstream

pytestmark = pytest.mark.slow  # waits out the crash-loop window

UPSTREAM = {"ttft": 0.01, "tokens_per_second": 500, "tokens_per_answer": 10}


def workers_of(service: ServiceProcess, count: int, seconds: float = 30.0) -> list[int]:
    """The supervisor's worker processes, once there are `count` of them that answer."""
    handle: subprocess.Popen[bytes] | None = service._proc  # the test signals the processes itself
    if handle is None:
        raise RuntimeError("not started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # spawn's resource tracker is a child too, but runs another module
        found = [p for p in child_processes(handle.pid) if b"resource_tracker" not in _cmdline(p)]
        if len(found) == count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {count} workers within {seconds:g} s")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def listening_sockets(port: int) -> set[str]:
    """The inodes of the IPv4 sockets listening on `port` (from /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                found.add(fields[9])
    return found


def sockets_held(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(target[len("socket:[") : -1])
    return held


def answers(root: str, n: int) -> list[str]:
    with openai.OpenAI(base_url=root + "/v1", api_key="k", max_retries=0, timeout=30) as client:
        return [
            client.chat.completions.create(model="normal:test", messages=[{"role": "user", "content": f"Q{i}?"}])
            .choices[0]
            .message.content
            or ""
            for i in range(n)
        ]


def test_a_worker_killed_after_its_start_is_replaced_and_the_server_keeps_answering() -> None:
    with running_upstream(**UPSTREAM) as upstream:
        service = ServiceProcess(serve_command(backend="openai", base_url=upstream, model="test", workers=2))
        try:
            root = service.start().rstrip("/")
            first = workers_of(service, 2)
            listening = listening_sockets(int(root.rsplit(":", 1)[1]))
            assert len(listening) == 2  # one socket per worker on the one port (SO_REUSEPORT)
            assert [len(sockets_held(pid) & listening) for pid in first] == [1, 1]
            assert sockets_held(first[0]) & listening != sockets_held(first[1]) & listening
            assert all(answers(root, 4))
            time.sleep(CRASH_LOOP_SECONDS + 0.5)  # past the crash-loop window of its start
            os.kill(first[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = workers_of(service, 2)
                if first[0] not in now:
                    break
                time.sleep(0.1)
            replaced = workers_of(service, 2)
            assert first[0] not in replaced and first[1] in replaced
            newcomer = next(pid for pid in replaced if pid != first[0] and pid != first[1])
            # The replacement took over the socket of the worker it replaced (and the connections waiting there).
            assert sockets_held(newcomer) & listening == listening - sockets_held(first[1])
            assert all(answers(root, 20))  # both workers answer, whichever the kernel hands a connection
            handle = service._proc
            assert handle is not None
            handle.send_signal(signal.SIGTERM)
            assert handle.wait(timeout=30) == 0
            assert f"worker {first[0]} exited with -9; replacing it" in service.log_text()
        finally:
            service.stop()


def test_a_worker_that_dies_at_its_start_stops_the_server_with_status_1() -> None:
    with running_upstream(**UPSTREAM) as upstream:
        service = ServiceProcess(serve_command(backend="openai", base_url=upstream, model="test", workers=2))
        try:
            service.start()
            victim, other = workers_of(service, 2)
            os.kill(victim, signal.SIGKILL)
            handle = service._proc
            assert handle is not None
            assert handle.wait(timeout=30) == 1  # no restart loop: the supervisor gives up at once
            assert not os.path.exists(f"/proc/{other}") or _cmdline(other) == b""  # the other worker is gone too
            assert f"worker {victim} exited with -9 at start" in service.log_text()
        finally:
            service.stop()
