"""Admission to the local engine's batch: which waiting request starts (first come, first served, when a sequence
and enough KV cells are free), which waits a step to share a prefix, and which is refused for lack of room."""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from sot.backends.base import Chunk
from sot.backends.local.kv_cells import KvCells, Slot, common_prefix
from sot.backends.local.llama_runtime import BACKEND_NAME
from sot.backends.local.requests import Counters, LocalRequest, Outbox, as_backend_error
from sot.errors import BackendCapacityError, BackendError, SoTError

if TYPE_CHECKING:
    from sot.backends.local.scheduler import SchedulerConfig

log = logging.getLogger("sot.backends.local.scheduler")

# A request waits for a running one to compute their shared prefix only when that saves at least this many
# prompt tokens: waiting costs it one step of latency.
_MIN_SHARED_TO_WAIT = 8


class AdmissionPolicy:
    """The admission half of `Scheduler` (a base class of it): every method runs on its worker thread, on the
    state the scheduler owns, declared here."""

    config: SchedulerConfig
    _cells: KvCells
    _stats: Counters
    _out: Outbox
    _waiting: collections.deque[LocalRequest]
    _active: list[LocalRequest]
    _max_active: int
    _step_no: int

    def _release(self, req: LocalRequest, *, retain: bool = True) -> None:
        raise NotImplementedError  # the scheduler's: takes a request out of the batch

    def _admit(self) -> None:
        """Start waiting requests, in arrival order, while a sequence is free and the KV cache has room.

        The first request that does not fit stops admission for this step (first come, first served: a
        large request is not overtaken forever by small ones); it is admitted once running requests finish
        or evictable prefix cache makes room.
        """
        deferred: list[LocalRequest] = []
        while self._waiting and len(self._active) < self._max_active:
            req = self._waiting[0]
            if self._prefix_in_flight(req):
                deferred.append(self._waiting.popleft())
                continue
            slot = self._cells.admit(req.prompt, req.reserve)
            if slot is None:
                if not req.waited:
                    req.waited = True
                    self._stats.bump("admission_waits")
                break
            self._waiting.popleft()
            self._start(req, slot)
        self._waiting.extendleft(reversed(deferred))  # back at the front, in arrival order

    def _start(self, req: LocalRequest, slot: Slot) -> None:
        req.slot = slot
        req.prompt_done = req.reused = len(slot.tokens)
        req.admitted_step = self._step_no
        self._active.append(req)
        self._out.deliver(req, Chunk(), final=False)  # admitted: the engine's "accepted" signal
        self._stats.add(
            requests=1,
            prompt_tokens=len(req.prompt),
            prompt_tokens_reused=req.reused,
            prompt_tokens_computed=len(req.prompt) - req.reused,
        )

    def _prefix_in_flight(self, req: LocalRequest) -> bool:
        """Whether `req` should wait a step for a running request that is computing a longer shared prefix.

        SoT's point requests arrive together and share everything up to their last few tokens. Admitted
        together, each would compute the shared part that no cache holds yet; the first one computes it
        while the others wait one step and then fork it, so the shared part is computed once.
        """
        leaders = [r for r in self._active if r.slot is not None and r.prompt_done < len(r.prompt)]
        if not leaders:
            return False
        _slot, cached = self._cells.longest_prefix(req.prompt)
        prompt = np.asarray(req.prompt, dtype=np.int32)
        pending = max(common_prefix(prompt, r.prompt) for r in leaders)
        return min(pending, len(req.prompt) - 1) >= cached + _MIN_SHARED_TO_WAIT

    def _expire_waiting(self) -> None:
        """Refuse requests that waited longer than `admission_wait` for room."""
        limit = self.config.admission_wait
        now = time.monotonic()
        expired = [r for r in self._waiting if now - r.arrived > limit]
        for req in expired:
            self._waiting.remove(req)
            waited = now - req.arrived
            missing = self._cells.shortfall(req.prompt, req.reserve)
            if len(self._active) >= self._max_active:
                why = f"all {self._max_active} sequences are busy"
            elif missing:
                why = (
                    f"the KV cache is full: the request needs {req.reserve} cells and {missing} of them are held "
                    f"or reserved by {len(self._active)} running requests (the cache holds {self._cells.capacity})"
                )
            else:
                why = "the KV cache is full: earlier requests are still waiting for cells"
            msg = f"no room for the request after {waited:.1f} s of waiting: {why}"
            self._refuse(req, BackendCapacityError(msg, backend=BACKEND_NAME))

    def _relieve_pressure(self) -> bool:
        """Free KV cells after a decode found none: a retained sequence, else the newest request is refused
        with BackendCapacityError (the one that has the least done; the oldest are never cut). False when
        there is nothing left to free."""
        if self._cells.evict_lru():
            return True
        if not self._active:
            return False
        newest = max(self._active, key=lambda r: (r.admitted_step, r.id))
        log.warning("local engine: KV cache full during decode; refusing request %d", newest.id)
        self._release(newest, retain=False)
        err = BackendCapacityError(
            "the KV cache is full: llama.cpp found no free cell for this request's next tokens", backend=BACKEND_NAME
        )
        self._refuse(newest, err)
        return True

    def _refuse(self, req: LocalRequest, exc: SoTError) -> None:
        if isinstance(exc, BackendCapacityError):
            self._stats.bump("capacity_errors")
        self._out.deliver(req, exc if isinstance(exc, BackendError) else as_backend_error(exc))
