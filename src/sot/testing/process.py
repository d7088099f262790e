"""Run a server module (the test upstream, `sot serve`) as a real subprocess on 127.0.0.1 and stop it.

Used by benchmarks and tests that need a real HTTP peer. The child announces its URL on one stdout line
(`... listening on http://127.0.0.1:PORT...`); we wait for that line, so `--port 0` works without races.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_READY = re.compile(r"listening on (http://\S+)")


def cli_flags(options: dict[str, Any]) -> list[str]:
    """{"tokens_per_second": 50, "access_log": True} -> ["--tokens-per-second", "50", "--access-log"]."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


class ServerProcess:
    """A child process that prints `listening on URL` once it accepts connections."""

    def __init__(self, command: Sequence[str], *, startup_timeout: float = 120.0) -> None:
        self.command = list(command)
        self.startup_timeout = startup_timeout
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="sot-server-", suffix=".log", delete=False)  # noqa: SIM115

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(self) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log_text())
            if match:
                self.url = match.group(1)
                return self.url
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.command[2:4]} exited with {self._proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.command} did not start within {self.startup_timeout:g} s:\n{self.log_text()}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def running_module(module: str, *args: str, **options: Any) -> Iterator[str]:
    """Run `python -m module --port 0 ...` and yield the URL it announced."""
    server = ServerProcess([sys.executable, "-m", module, "--port", "0", *args, *cli_flags(options)])
    try:
        yield server.start()
    finally:
        server.stop()


def running_test_upstream(**options: Any) -> contextlib.AbstractContextManager[str]:
    """The bundled OpenAI-compatible test upstream; yields its base URL ("http://127.0.0.1:PORT/v1")."""
    return running_module("sot.testing.upstream", **options)
