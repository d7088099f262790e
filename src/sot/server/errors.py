"""Error answers of `sot serve`: the OpenAI error object, and what each failure maps to.

Every error the server sends, whatever raised it (a limit, a validation error, the backend, a bug), is the
object OpenAI clients expect: `{"error": {"message", "type", "param", "code"}}` with a fitting HTTP status.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sot.errors import (
    AuthenticationError,
    BackendCapacityError,
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendStreamError,
    BackendTimeoutError,
    BadRequestError,
    InputError,
    RateLimitError,
)

log = logging.getLogger("sot.server")


class ApiError(Exception):
    """An error answer: HTTP status and the OpenAI error object's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _upstream(status: int, message: str, code: str, exc: BackendError) -> ApiError:
    return ApiError(status, f"{message} ({exc.message})", type="upstream_error", code=code)


def map_error(exc: BaseException, retry_after: int) -> ApiError:
    """The status and error object a client should see for a failure of the engine or its backend.

    `retry_after` is the server's own wait, sent on a 429 when the upstream did not say how long to wait.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), code="invalid_input")
    if isinstance(exc, RateLimitError):
        wait = exc.retry_after if exc.retry_after is not None else retry_after
        return ApiError(
            429,
            f"The model upstream is rate limiting us; retry later. ({exc.message})",
            type="rate_limit_error",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    if isinstance(exc, AuthenticationError):
        # The client's own key is fine; the server's key for the upstream is not: a gateway error.
        return _upstream(
            502, "The model upstream refused the server's credentials.", "upstream_authentication_failed", exc
        )
    if isinstance(exc, BadRequestError):
        if exc.status_code == 404:
            return _upstream(
                502, "The model upstream does not know the configured model.", "upstream_model_not_found", exc
            )
        return ApiError(400, f"The model upstream rejected the request. ({exc.message})", code="upstream_bad_request")
    if isinstance(exc, BackendTimeoutError):
        return _upstream(504, "The model upstream timed out.", "upstream_timeout", exc)
    if isinstance(exc, BackendConnectionError):
        return _upstream(502, "The model upstream could not be reached.", "upstream_unreachable", exc)
    if isinstance(exc, BackendStatusError | BackendStreamError):
        return _upstream(502, "The model upstream failed.", "upstream_error", exc)
    if isinstance(exc, BackendCapacityError):
        return ApiError(
            503,
            f"The model has no room for this request now; retry later. ({exc.message})",
            type="server_error",
            code="model_at_capacity",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, BackendError):
        return ApiError(500, f"The model backend failed. ({exc.message})", type="server_error", code="backend_error")
    log.error("unexpected error while answering", exc_info=exc)
    return ApiError(500, "The server had an error while processing the request.", type="server_error")


# -- request validation ------------------------------------------------------------------------------------

# Pydantic names the member of a union it tried ("str", "list[ContentPart]", "ContentPart") in an error's
# location; those are not part of the request's JSON, so the parameter's path leaves them out.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list"})


def _is_union_member(part: str) -> bool:
    return part in _TYPE_NAMES or "[" in part or part[:1].isupper()


def json_path(loc: Sequence[int | str]) -> str | None:
    """The request parameter an error location names, as a JSON path: ("body", "messages", 2, "content")
    -> "messages[2].content"; None for the body as a whole."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_member(part):
            path += f".{part}" if path else part
    return path or None


def _union_root(loc: Sequence[int | str]) -> tuple[int | str, ...]:
    """The location up to the first union member: errors of one value's alternatives share it."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and _is_union_member(part):
            return tuple(loc[:i])
    return tuple(loc)


def validation_error(exc: RequestValidationError) -> ApiError:
    """The 400 for a request FastAPI could not parse or validate (OpenAI answers those with 400, not 422).

    `param` is the JSON path of the first invalid value; of a union's alternatives, the one that got
    furthest names it (`stop[1]` rather than `stop` for `"stop": ["a", 3]`).
    """
    errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": "invalid"}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        # The location is a character offset into the body, not a parameter.
        detail = first.get("ctx", {}).get("error") or first.get("msg")
        where = [p for p in first.get("loc", ())[1:] if isinstance(p, int)]
        at = f" (at character {where[0]})" if where else ""
        message = f"We could not parse the JSON body of your request: {detail}{at}."
        return ApiError(400, message, code="invalid_value")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "missing":
        return ApiError(400, "The request has no body: send a JSON object.", code="invalid_value")
    root = _union_root(first.get("loc", ()))
    alternatives = [e for e in errors if _union_root(e.get("loc", ())) == root]
    chosen = max(alternatives, key=lambda e: len(json_path(e.get("loc", ())) or ""))
    param = json_path(chosen.get("loc", ()))
    message = f"{param}: {chosen.get('msg')}" if param else str(chosen.get("msg"))
    others = len({_union_root(e.get("loc", ())) for e in errors}) - 1
    if others:
        message += f" (and {others} more problem(s))"
    return ApiError(400, message, param=param, code="invalid_value")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI, retry_after: int) -> None:
    """Make every error the app can raise an OpenAI error object."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return map_error(exc, retry_after).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for that class only
            return map_error(exc, retry_after).response()
        headers = dict(exc.headers or {})
        error = ApiError(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code), headers=headers)
        return error.response()

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for that class only
            return map_error(exc, retry_after).response()
        return validation_error(exc).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, api_error)
