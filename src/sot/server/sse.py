"""The streamed response: server-sent events written straight to the ASGI `send`, in the request's own task.

Every chunk of every stream passes through here, so it does as little as it can: one `send` per write, no
task, timer or cancel scope per response or per write (a general SSE library spends more on those than on
the text it relays when hundreds of streams run at once). Keep-alive comments come from the body itself (see
`relay`), and a client that disconnects is noticed by the pump's watcher, which ends the body.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PING = b": ping\n\n"  # an SSE comment: clients and proxies see traffic, parsers ignore it


class EventStreamResponse(Response):
    """A `text/event-stream` response of the bytes `body` yields; `on_close` runs however the response ends."""

    media_type = "text/event-stream"

    def __init__(
        self, body: AsyncGenerator[bytes, None], headers: Mapping[str, str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Starlette sets a Content-Length of 0 for an empty body: a stream has none.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.body_iterator = body
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with contextlib.aclosing(self.body_iterator) as chunks:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.on_close()
