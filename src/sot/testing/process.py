"""Run a server module (the test upstream, `sot serve`) as a real subprocess on 127.0.0.1, and stop it.

Used by benchmarks and tests that need a real HTTP peer. A child announces its URL on one output line
(`... listening on http://127.0.0.1:PORT...`) once its socket listens, so `--port 0` works without races;
readiness also waits for `/health`. Output goes to a log file that errors quote.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_READY = re.compile(r"listening on (http://\S+)")
# Loopback only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The working tree's package, whether or not `sot` is installed in the interpreter the child runs.
_SRC_DIR = Path(__file__).resolve().parents[2]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat from the third (state) on, so field N of proc(5) is item N - 3 (Linux).
    Split after the name, which may hold spaces. OSError when the process is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def child_processes(pid: int) -> list[int]:
    """The ids of the living processes whose parent is `pid` (from /proc; Linux)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(proc_stat(int(entry.name))[1])  # field 4, ppid
            except OSError:  # it exited meanwhile
                continue
            if parent == pid:
                children.append(int(entry.name))
    return children


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process that needs its port up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """A server subprocess that prints "... listening on http://HOST:PORT..." once ready, and answers /health.

    `launch()` starts it and returns at once (so several can start in parallel); `wait_ready()` waits for the
    line and a healthy /health and returns the announced URL. Output goes to a log file, shown on failure.
    """

    def __init__(self, command: Sequence[str], *, name: str = "server", startup_timeout: float = 60.0) -> None:
        self.command = list(command)
        self.name = name
        self.startup_timeout = startup_timeout
        self.url = ""  # as announced, e.g. "http://127.0.0.1:PORT" or ".../v1"
        self.root_url = ""  # without a trailing /v1
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"sot-{name}-", suffix=".log", delete=False)  # noqa: SIM115

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def launch(self) -> ServiceProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SRC_DIR), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        return self

    def wait_ready(self) -> str:
        if self._proc is None:
            raise RuntimeError("launch() first")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log_text()
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{log}")
            if not self.url:
                found = _READY.search(self.log_text())
                if found:
                    self.url = found.group(1)
                    self.root_url = self.url.rstrip("/").removesuffix("/v1")
            if self.url:
                try:
                    with _OPENER.open(self.root_url + "/health", timeout=2) as response:
                        if response.status == 200:
                            return self.url
                except OSError:
                    pass
            time.sleep(0.03)
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy within {self.startup_timeout:g} s:\n{log}")

    def start(self) -> str:
        return self.launch().wait_ready()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (to stop several processes at once, then `stop()` each)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; removes the log."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def upstream_command(port: int = 0, **options: Any) -> list[str]:
    """`python -m sot.testing.upstream` with options as flags (`tokens_per_second=50` -> --tokens-per-second 50)."""
    return [sys.executable, "-m", "sot.testing.upstream", "--port", str(port), *cli_flags(options)]


def serve_command(port: int = 0, **options: Any) -> list[str]:
    """`sot serve` (as `python -m sot.cli.serve`) with options as flags."""
    return [sys.executable, "-m", "sot.cli.serve", "--port", str(port), *cli_flags(options)]


def cli_flags(options: dict[str, Any]) -> list[str]:
    """{"tokens_per_second": 50, "access_log": True, "record_headers": ["a", "b"]} ->
    ["--tokens-per-second", "50", "--access-log", "--record-headers", "a,b"] (lists and tuples: comma-joined)."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            flags += [flag, ",".join(str(v) for v in value)]
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


def fetch_json(url: str, *, method: str = "GET", timeout: float = 5.0) -> Any:
    """GET (or POST with an empty body) a loopback URL and decode its JSON answer."""
    import json

    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with _OPENER.open(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


@contextlib.contextmanager
def running_test_upstream(**options: Any) -> Iterator[str]:
    """The bundled OpenAI-compatible test upstream; yields its base URL ("http://127.0.0.1:PORT/v1")."""
    with ServiceProcess(upstream_command(**options), name="upstream") as process:
        yield process.url
