"""Checks that run before a request is answered: the body size limit (pure ASGI) and the bearer-token auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from sot.server.errors import ApiError
from sot.server.parsing import ServerSettings


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server accepts ({limit:,} bytes).")


class BodyLimitMiddleware:
    """413 for a body over the limit, whether it announces its length or streams it (pure ASGI)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.limit
                except ValueError:
                    too_large = False
                if too_large:
                    error = ApiError(413, str(_BodyTooLarge(self.limit).detail), code="request_too_large")
                    await error.response()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> AsgiMessage:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI turns other exceptions raised while reading the body into a 400.
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


_BEARER = HTTPBearer(auto_error=False, description="The server's API key, when it was started with one.")


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    """The bearer-token check of /v1/* (a no-op when the server has no key)."""
    settings: ServerSettings = request.app.state.sot.settings
    if settings.api_key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer KEY'."
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
