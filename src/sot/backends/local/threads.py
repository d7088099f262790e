"""Choose llama.cpp's thread count from how much CPU *other* processes are using right now.

Why: llama.cpp's threads meet at a barrier many times per decode step, so one descheduled thread stalls
the whole step. On the 2-core target, while another process kept one core busy, a decode step took
80-3000 ms with 2 threads against 12-20 ms with 1; on an idle machine 2 threads are faster. Probing the
alternatives online proved too costly (a single bad probe step could take 3 s), so this reads the kernel's
CPU accounting instead (/proc/stat minus our own process) and leaves the busy cores to their owners.
It proposes a number; it never touches llama.cpp itself.
"""

from __future__ import annotations

import math
import os
import time


def _read_busy_ticks() -> tuple[int, int] | None:
    """(all CPUs' busy ticks, this process's CPU ticks), or None where /proc is unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        with open("/proc/self/stat") as fh:
            own = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
    vals = [int(v) for v in fields[1:9]]
    busy = sum(vals) - vals[3] - vals[4]
    # After the ")" of the command name: state is field 3, utime and stime are fields 14 and 15.
    mine = int(own[11]) + int(own[12])
    return busy, mine


class ThreadAdvisor:
    """Thread count = usable cores minus the cores other processes keep busy (EWMA over ~1 s windows)."""

    def __init__(self, n_cores: int, *, interval_s: float = 1.0, tolerance: float = 0.3) -> None:
        self.n_cores = max(1, n_cores)
        self._interval = interval_s
        # Other processes may use this much of a core before we leave one to them (a shell, a logger).
        self._tolerance = tolerance
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = _read_busy_ticks()
        self._last_t = time.monotonic()
        self.others = 0.0  # smoothed cores used by other processes
        self.current = self.n_cores
        self.enabled = self._last is not None and self.n_cores > 1

    def _sample(self) -> float | None:
        now_ticks, now_t = _read_busy_ticks(), time.monotonic()
        if now_ticks is None or self._last is None:
            return None
        (busy0, mine0), t0 = self._last, self._last_t
        self._last, self._last_t = now_ticks, now_t
        elapsed = now_t - t0
        if elapsed <= 0:
            return None
        others = ((now_ticks[0] - busy0) - (now_ticks[1] - mine0)) / self._hz / elapsed
        return max(0.0, others)

    def _decide(self) -> int:
        excess = self.others - self._tolerance
        leave = math.ceil(excess) if excess > 0 else 0
        return max(1, min(self.n_cores, self.n_cores - leave))

    def measure_now(self, window_s: float = 0.25) -> int:
        """A first decision from a short window (used at load, before any decoding)."""
        if not self.enabled:
            return self.current
        self._sample()
        time.sleep(window_s)
        others = self._sample()
        if others is not None:
            self.others = others
            self.current = self._decide()
        return self.current

    def update(self) -> int | None:
        """Call between steps; returns a new thread count when it should change, else None."""
        if not self.enabled or time.monotonic() - self._last_t < self._interval:
            return None
        others = self._sample()
        if others is None:
            return None
        self.others = 0.5 * self.others + 0.5 * others
        want = self._decide()
        if want == self.current:
            return None
        self.current = want
        return want


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
