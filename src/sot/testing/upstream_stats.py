"""Request bookkeeping of the test upstream: one record per chat completion request, counters, fault dice."""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sot.testing.upstream_cache import PromptCache
from sot.testing.upstream_options import RECORDED_HEADERS, UpstreamOptions

RECENT_LIMIT = 500


@dataclass(slots=True)
class RequestRecord:
    """One chat completion request, as /stats reports it.

    `*_at` are wall-clock Unix times (time.time()); `*_monotonic` are time.monotonic() of the same moments,
    which on Linux compare with another process's time.monotonic() on the same machine.
    """

    id: str
    index: int
    kind: str
    stream: bool
    fault: str | None
    model: str
    max_tokens: int | None
    prompt_tokens: int
    prompt_cache_key: str | None
    last_user: str
    started_at: float  # the request arrived (before its body was read)
    started_monotonic: float = 0.0
    user: str | None = None  # the body's `user` field
    # Recorded request headers that were present (lower-case names): x-sot-session, x-request-id and
    # any named by --record-headers.
    headers: dict[str, str] = field(default_factory=dict)
    planned_tokens: int = 0  # the length of the whole answer, before any fault cuts it
    first_token_at: float | None = None
    first_token_monotonic: float | None = None
    ended_at: float | None = None
    ended_monotonic: float | None = None
    # active -> finished (we sent the whole response, faulty or not) | cancelled (the client went away
    # first) | failed (a bug in this server).
    status: str = "active"
    # The same end, telling faults apart: active -> completed (finished, no fault) | faulted (finished with
    # a fault applied) | cancelled | failed.
    outcome: str = "active"
    http_status: int = 200
    completion_tokens: int = 0  # tokens sent so far (written to the connection)
    finish_reason: str | None = None
    api: str = "chat"  # "chat" (POST /v1/chat/completions) or "messages" (POST /v1/messages)
    # Messages API only: the final assistant turn being continued (the prefill), and the prompt tokens split
    # by the prompt cache (see `sot.testing.upstream_cache`).
    prefill: str | None = None
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def mark_first_token(self) -> None:
        """The first chunk (streams) or the whole answer (JSON) is about to go out."""
        self.first_token_at = time.time()
        self.first_token_monotonic = time.monotonic()


class UpstreamState:
    """Counters, recent requests and the fault dice of one server."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        # Request headers that /stats records, lower case, each once.
        self.recorded_headers = tuple(dict.fromkeys((*RECORDED_HEADERS, *options.record_headers)))
        # Response ids stay unique across resets.
        self.ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        """Forget all requests; `fault_first` and the fault dice start over too."""
        self._rng = random.Random(self.options.seed)
        self.started = 0
        self.eligible = 0  # requests of the kind that --fault-kind allows
        self.finished = 0
        self.cancelled = 0
        self.failed = 0
        self.faulted = 0
        self.max_active = 0
        self.recent: deque[RequestRecord] = deque(maxlen=RECENT_LIMIT)
        self.prompt_cache = PromptCache()  # the Messages API's cache_control accounting

    @property
    def active(self) -> int:
        return self.started - self.finished - self.cancelled - self.failed

    def recorded(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The headers of a request that /stats records (those of `recorded_headers` it has)."""
        return {name: headers[name] for name in self.recorded_headers if name in headers}

    def roll_fault(self, kind: str, overrides: Mapping[str, Any]) -> str | None:
        """The fault for the next request, of `kind`: with --fault-kind, only requests of that kind (or one that
        names its own fault) get one, and --fault-first counts only those."""
        if self.options.fault_kind not in (None, kind) and "fault" not in overrides:
            return None
        fault = self.choose_fault(self.eligible, overrides)
        self.eligible += 1
        return fault

    def choose_fault(self, index: int, overrides: Mapping[str, Any]) -> str | None:
        """The fault for the `index`-th request (0-based): its own choice first, else the server's."""
        if "fault" in overrides:
            fault: str | None = overrides["fault"]
            rate = overrides.get("fault_rate", 1.0)
        else:
            fault = self.options.fault
            if fault is None:
                return None
            if self.options.fault_first > 0:
                return fault if index < self.options.fault_first else None
            rate = overrides.get("fault_rate", self.options.fault_rate)
        if fault is None or rate <= 0:
            return None
        return fault if rate >= 1 or self._rng.random() < rate else None

    def begin(self, record: RequestRecord) -> None:
        self.started += 1
        if record.fault is not None:
            self.faulted += 1
        self.recent.append(record)
        self.max_active = max(self.max_active, self.active)

    def end(self, record: RequestRecord, status: str) -> None:
        """Record how a request ended: "finished", "cancelled" or "failed" (only the first call counts)."""
        if record.status != "active":
            return
        record.status = status
        record.ended_at = time.time()
        record.ended_monotonic = time.monotonic()
        if status == "finished":
            self.finished += 1
            record.outcome = "completed" if record.fault is None else "faulted"
        elif status == "cancelled":
            self.cancelled += 1
            record.outcome = "cancelled"
        else:
            self.failed += 1
            record.outcome = "failed"

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "active": self.active,
            "max_active": self.max_active,
            "faulted": self.faulted,
            "prompt_cache": {
                "entries": len(self.prompt_cache),
                "reads": self.prompt_cache.reads,
                "writes": self.prompt_cache.writes,
            },
            "requests": [asdict(r) for r in self.recent],
        }
