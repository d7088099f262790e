"""Admission: how many questions the server answers at once, and the 429 for one more."""

from __future__ import annotations

from sot.server.errors import ApiError


class Gate:
    """Counts questions in flight; a question beyond the limit is refused at once, never queued."""

    def __init__(self, limit: int, retry_after: int = 1) -> None:
        self.limit = limit
        self.retry_after = retry_after  # seconds, sent with the 429
        self.active = 0

    def enter(self) -> Lease:
        """A slot for one question, or a 429 with `Retry-After` when every slot is taken."""
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"The server is answering {self.active} questions, its limit; retry in {self.retry_after} s.",
                type="rate_limit_error",
                code="server_overloaded",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1
        return Lease(self)


class Lease:
    """One question's slot in the `Gate`; releasing twice is harmless (several cleanup paths may run)."""

    def __init__(self, gate: Gate) -> None:
        self._gate: Gate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.active -= 1
            self._gate = None
