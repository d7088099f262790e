"""Several worker processes on one address (`sot serve --workers N`), and the server of one process.

The supervisor binds nothing itself: it is handed the sockets `sot serve` bound (so `--port 0` works and the
address is announced before any worker starts) and starts N workers with the `spawn` method. Each worker
builds its own engine (its own event loop, connection pool and, for the embedded model, its own model) and
accepts on its own socket of the address (SO_REUSEPORT: Linux spreads connections evenly among them), or on
the one shared socket where the system does not spread them. The supervisor keeps every socket open: a worker
that replaces a dead one takes over its socket and the connections waiting on it. With metrics on, the
supervisor gives the workers a fresh `PROMETHEUS_MULTIPROC_DIR`, so /metrics adds up every worker's values.

On SIGTERM or SIGINT the supervisor passes SIGTERM to every worker, each drains (`sot.server.lifecycle`),
and the supervisor exits 0 once all have exited 0. A worker that dies on its own is replaced, unless it
died within `CRASH_LOOP_SECONDS` of its start: then the supervisor stops everything and exits 1.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from sot.engine import Engine
from sot.server.metrics import MULTIPROC_ENV
from sot.server.parsing import ServerSettings

CRASH_LOOP_SECONDS = 10.0
EXIT_GRACE = 10.0  # seconds past the drain time before a worker that has not exited is killed


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its app, picklable: `build(params)` makes the worker's engine
    (a module-level function, so it is pickled by name), `uvicorn` holds `uvicorn.Config`'s options."""

    build: Callable[[dict[str, Any]], Engine]
    params: dict[str, Any]
    settings: ServerSettings
    uvicorn: dict[str, Any] = field(default_factory=dict)


def freeze_startup_heap() -> None:
    """Put everything allocated so far (the modules, the app, the engine, the router's model) beyond the garbage
    collector's full collections. Under load they otherwise scan all of it again and again: with 200 streams
    at once, three full collections cost ~110 ms each, a pause for every stream."""
    gc.collect()
    gc.freeze()


def serve_app(spec: WorkerSpec, sock: socket.socket, engine: Engine | None = None, parent: int | None = None) -> None:
    """Run the app of `spec` on `sock` in this process until it has drained (see `DrainingServer`)."""
    from sot.server.app import create_app
    from sot.server.lifecycle import DrainingServer

    built = engine if engine is not None else spec.build(spec.params)
    app = create_app(lambda: built, spec.settings)
    config = uvicorn.Config(app, **spec.uvicorn)
    freeze_startup_heap()
    DrainingServer(config, app.state.sot, parent_pid=parent).run(sockets=[sock])


def _worker_main(spec: WorkerSpec, sock: socket.socket, parent: int) -> None:
    serve_app(spec, sock, parent=parent)


class Supervisor:
    """Starts `count` workers, worker i on `sockets[i]` (or all on one shared socket), replaces those that die
    (on the socket of the one replaced), and stops them all on a signal."""

    def __init__(self, spec: WorkerSpec, sockets: list[socket.socket], count: int) -> None:
        if len(sockets) not in (1, count):
            raise ValueError(f"{count} workers need 1 shared socket or {count} sockets, not {len(sockets)}")
        self.spec = spec
        self.sockets = sockets
        self.count = count
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[tuple[BaseProcess, float]] = []
        self.stopping = False

    def _start(self, index: int) -> tuple[BaseProcess, float]:
        sock = self.sockets[index % len(self.sockets)]
        process = self.context.Process(
            target=_worker_main, args=(self.spec, sock, os.getpid()), name="sot-serve-worker", daemon=False
        )
        process.start()
        return process, time.monotonic()

    def _on_signal(self, sig: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Supervise until a signal (exit code 0 when every worker drained and exited 0) or a crash loop (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.workers = [self._start(i) for i in range(self.count)]
            crashed = self._watch()
            return self._stop() or crashed
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> int:
        while not self.stopping:
            wait([process.sentinel for process, _ in self.workers], timeout=0.2)
            for i, (process, started) in enumerate(self.workers):
                if process.is_alive() or self.stopping:
                    continue
                _forget(process)
                if time.monotonic() - started < CRASH_LOOP_SECONDS:
                    print(f"sot serve: worker {process.pid} exited with {process.exitcode} at start", file=sys.stderr)
                    return 1
                print(f"sot serve: worker {process.pid} exited with {process.exitcode}; replacing it", file=sys.stderr)
                self.workers[i] = self._start(i)
        return 0

    def _stop(self) -> int:
        """SIGTERM to every worker, then wait for their drains; 1 if any had to be killed or failed."""
        for process, _ in self.workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.spec.settings.drain_seconds + EXIT_GRACE
        code = 0
        for process, _ in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            code = code or (0 if process.exitcode == 0 else 1)
            _forget(process)
        return code


def _forget(process: BaseProcess) -> None:
    """A worker is gone: its live gauges no longer count (multi-process metrics)."""
    if os.environ.get(MULTIPROC_ENV) and process.pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid)


@contextlib.contextmanager
def metrics_dir(enabled: bool) -> Iterator[None]:
    """A fresh `PROMETHEUS_MULTIPROC_DIR` for the workers (unless one is set already), removed afterwards."""
    if not enabled or os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="sot-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def run_workers(spec: WorkerSpec, sockets: list[socket.socket], count: int) -> int:
    """Serve with `count` worker processes on `sockets` (one each, or one shared); the exit code for the command."""
    with metrics_dir(spec.settings.metrics):
        return Supervisor(spec, sockets, count).run()
