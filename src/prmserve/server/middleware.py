"""ASGI middleware: body-size limit (declared and streamed), per-route latency/error metrics, one log line per request."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prmserve.server.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, status: int, message: str, kind: str, param: str | None = None) -> None:
    """Answer with the API's error body, outside FastAPI."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status, "param": param}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, by its Content-Length or, when that lies or is absent, as it streams in.

    The body is read here in full (it would be anyway) and replayed to the app; later `receive` calls
    pass through, so routes can still watch for the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"the request body is over the server's limit of {self.max_bytes} bytes", "payload_too_large")


class _StatusNotingSend:
    """A `send` that remembers the response's status (500 until one starts)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class MetricsMiddleware:
    """Time every HTTP request and count error statuses, labelled by route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        noting = _StatusNotingSend(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.observe_request(route, noting.status, time.perf_counter() - started)


class RequestLogMiddleware:
    """One line per request on the "prmserve" logger: method, path, status, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.logger = logging.getLogger("prmserve")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        noting = _StatusNotingSend(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            ms = (time.perf_counter() - started) * 1000
            self.logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], noting.status, ms)
