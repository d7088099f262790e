"""Structured access logs (`--access-log-json`): one JSON object per request, on one line, to stderr or a file.

Each line is written with one `write` to a descriptor opened for appending, so the lines of several workers
sharing a file never interleave.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from sot.server.chunks import dumps
from sot.server.observe import RequestRecord, fallback_kind

STDERR = "-"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def log_entry(record: RequestRecord) -> dict[str, Any]:
    """The fields of one request's line (answer fields are null for other endpoints and unanswered questions)."""
    result = record.result
    stats = result.stats if result is not None else None
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.started_at))
        + f".{int(record.started_at % 1 * 1000):03d}Z",
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "outcome": record.outcome,
        "duration_s": _round(record.duration),
        "mode_requested": record.mode_requested,
        "mode_used": result.mode_used if result is not None else None,
        "stream": record.stream,
        "routing_key": record.routing_key,
        "rejected": record.rejected,
        "error": record.error_code,
        "points": len(result.points) if result is not None and result.mode_used == "sot" else None,
        "fallback_reason": result.fallback_reason if result is not None else None,
        "fallback_kind": fallback_kind(result.fallback_reason) if result is not None else None,
        "upstream_requests": stats.requests if stats is not None else None,
        "retries": stats.retries if stats is not None else None,
        "prompt_tokens": stats.prompt_tokens if stats is not None else None,
        "completion_tokens": stats.completion_tokens if stats is not None else None,
        "first_answer_s": _round(record.first_answer - record.started) if record.first_answer is not None else None,
        "ttft_s": _round(stats.time_to_first_token) if stats is not None else None,
        "skeleton_s": _round(stats.skeleton_seconds) if stats is not None else None,
        "slowest_point_s": _round(stats.slowest_point_seconds) if stats is not None and stats.points else None,
        "total_s": _round(stats.total_seconds) if stats is not None else None,
    }
    return entry


class AccessLog:
    """Writes one JSON line per request to stderr (`-`) or appends it to a file."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._fd: int | None = 2 if target == STDERR else os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: RequestRecord) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a full disk or a closed stderr must not fail the request
            os.write(self._fd, dumps(log_entry(record)) + b"\n")

    def close(self) -> None:
        if self._fd is not None and self._fd != 2:
            os.close(self._fd)
        self._fd = None
