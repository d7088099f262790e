"""The project's exception tree; lower-level errors are mapped to these at one boundary (the backend).

    SoTError
     ├── ConfigError            bad options: unknown backend, missing model file, bad prompt file
     ├── InputError             bad input: empty or oversized question, malformed conversation
     └── BackendError           anything that went wrong talking to a model
          ├── BackendConnectionError   the endpoint could not be reached
          ├── BackendTimeoutError      a request or a point exceeded its deadline
          ├── BackendStatusError       the upstream answered with an HTTP error (status kept)
          │    ├── AuthenticationError  401 / 403
          │    ├── RateLimitError       429 (retry_after kept when the upstream sent it)
          │    └── BadRequestError      400 / 404 / 422
          ├── BackendStreamError       the stream broke: cut without a finish reason, error object mid-stream,
          │                            a malformed chunk, or a backend that broke the `Backend` contract
          └── BackendCapacityError     the backend has no room for the request (the embedded engine's KV
                                       cache is full of running work); nothing was cut to make room

Retries happen in one place only: the engine's retry policy (`sot.retry`). Backends and SDKs do not retry.
"""

from __future__ import annotations


class SoTError(Exception):
    """Base class of every error raised by `sot`."""


class ConfigError(SoTError):
    """The configuration cannot work: unknown backend, missing model file, malformed prompt file."""


class InputError(SoTError):
    """The question or conversation cannot be answered as given."""


class BackendError(SoTError):
    """Talking to a model failed. `message` keeps the upstream's own words."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend


class BackendConnectionError(BackendError):
    """The endpoint could not be reached (refused, DNS, TLS)."""


class BackendTimeoutError(BackendError):
    """A request, or one point of a skeleton answer, exceeded its deadline."""


class BackendStatusError(BackendError):
    """The upstream answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int, backend: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.status_code = status_code


class AuthenticationError(BackendStatusError):
    """The upstream refused our credentials (401/403)."""


class RateLimitError(BackendStatusError):
    """The upstream is overloaded (429); `retry_after` is in seconds when it said."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        retry_after: float | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, backend=backend)
        self.retry_after = retry_after


class BadRequestError(BackendStatusError):
    """The upstream rejected the request itself (400/404/422): retrying will not help."""


class BackendStreamError(BackendError):
    """The stream broke: it ended without a finish reason, or carried an error object."""


class BackendCapacityError(BackendError):
    """The backend cannot hold this request now (e.g. its KV cache is full of running requests).

    Running work is never ended to make room; the request that does not fit gets this error instead of a
    made-up finish reason.
    """
