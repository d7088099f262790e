"""The one retry policy: which failures are retried, how long to wait, and how many extra requests a question may cost.

Nothing else in `sot` retries: the `openai` SDK runs with `max_retries=0`, backends raise at once, and the
engine asks this module before sending any request again. A retry happens only when all of these hold:

- the error is transient: a connection error, a timeout, a broken stream, or an HTTP 408, 409, 429 or 5xx
  (never 400, 401, 403, 404, 422, nor a backend that broke its contract or ran out of room);
- nothing of the failed request has reached the answer a client reads (a retry would write it twice);
- the attempt is below `max_attempts` and the question's budget of extra requests is not spent;
- the wait (exponential backoff with full jitter, at least the upstream's `Retry-After`) still ends
  before the stage's deadline.

>>> policy = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter=False)
>>> [policy.backoff(n) for n in (1, 2, 3, 4, 5)]
[1.0, 2.0, 4.0, 8.0, 8.0]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sot.errors import (
    BackendCapacityError,
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendStreamError,
    BackendTimeoutError,
    RateLimitError,
)

RETRYABLE_STATUS = frozenset({408, 409, 429})


class ContractError(BackendStreamError):
    """A backend broke the `Backend` contract (no chunks, no finish reason, a foreign exception).

    Retrying would break it again, so the policy never retries these.
    """


def is_transient(error: BackendError) -> bool:
    """Whether sending the same request again may succeed."""
    if isinstance(error, ContractError | BackendCapacityError):
        return False
    if isinstance(error, BackendStatusError):
        return error.status_code in RETRYABLE_STATUS or error.status_code >= 500
    return isinstance(error, BackendConnectionError | BackendTimeoutError | BackendStreamError)


def retry_after(error: BackendError) -> float | None:
    """The upstream's own `Retry-After`, in seconds, when it sent one."""
    return error.retry_after if isinstance(error, RateLimitError) else None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how soon a failed request is sent again. One instance per engine; see the module docstring."""

    max_attempts: int = 3  # per request, the first one included
    budget: int = 4  # extra requests one question may spend on retries, over all its stages
    base_delay: float = 0.25
    max_delay: float = 8.0
    jitter: bool = True

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based), before any `Retry-After`."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0.0, ceiling) if self.jitter else ceiling

    def delay(self, error: BackendError, attempt: int, *, time_left: float, budget: RetryBudget) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the error must be given up on."""
        if not is_transient(error) or attempt >= self.max_attempts or budget.left <= 0:
            return None
        wait = self.backoff(attempt)
        asked = retry_after(error)
        if asked is not None:
            wait = max(wait, asked)
        if wait >= time_left:
            return None  # the stage would end before the retry could even start
        budget.spend()
        return wait


@dataclass
class RetryBudget:
    """Extra requests one question may still spend on retries (shared by its skeleton, points and answer)."""

    left: int
    spent: int = field(default=0)

    def spend(self) -> None:
        self.left -= 1
        self.spent += 1
