"""ASGI middleware: the API key (before any body is read), the body's size and read-time limits, per-route
latency/error metrics, one log line per request; and the shutdown moments they share with the routes."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from prmserve.server.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CLOSE = (b"connection", b"close")
RETRY_AFTER_S = 1


async def send_error(
    send: Send, status: int, message: str, kind: str, param: str | None = None, headers: Collection[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with the API's error body, outside FastAPI."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status, "param": param}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def send_shutting_down(send: Send) -> None:
    """503 with Retry-After for a request the stopping server will not serve; the connection closes after it."""
    retry = (b"retry-after", str(RETRY_AFTER_S).encode())
    await send_error(send, 503, "the server is shutting down; retry on another instance", "shutting_down", headers=(retry, CLOSE))


class Moment:
    """A one-time event that requests on any event loop may await (an `asyncio.Event` binds to the first loop that waits)."""

    def __init__(self) -> None:
        self.reached = False
        self._waiters: set[asyncio.Future] = set()

    def reach(self) -> None:
        self.reached = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        if self.reached:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


class Shutdown:
    """The server's stop as requests see it: `begun` on SIGTERM (no new work, bodies still coming get 503),
    `expired` when what still computes must be answered (503) so the process exits within its bound."""

    def __init__(self) -> None:
        self.begun = Moment()
        self.expired = Moment()

    def begin(self, answer_within: float) -> None:
        """On the serving event loop, once uvicorn stops accepting: `begun` now, `expired` in `answer_within` seconds."""
        self.begun.reach()
        asyncio.get_running_loop().call_later(answer_within, self.expired.reach)


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's, less the root path a proxy put in front (as Starlette strips it)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


class AuthMiddleware:
    """401 for a request without `Authorization: Bearer <api_key>`, before its body is read or parsed.

    `open_paths` (exact) and `open_prefixes` need no key (liveness probes, the web page and its assets).
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Collection[str], open_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = open_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(route_path(scope)) or self._authorized(scope):
            return await self.app(scope, receive, send)
        await send_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "unauthorized")

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def _authorized(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, by its Content-Length or, when that lies or is absent, as it streams in;
    408 for one not in within `read_timeout` seconds, 503 for one still coming when shutdown begins
    (both close the connection, so a stalled client holds nothing).

    The body is read here in full (it would be anyway) and replayed to the app; later `receive` calls
    pass through, so routes can still watch for the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float, shutdown: Shutdown) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        reading = asyncio.ensure_future(self._read(receive, send))
        stopping = asyncio.ensure_future(self.shutdown.begun.wait())
        try:
            await asyncio.wait({reading, stopping}, timeout=self.read_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not reading.done():
            reading.cancel()
            return await self._give_up(send)
        body = reading.result()
        if body is None:
            return  # answered 413, or the client left before sending its body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body; None when the client left, or when it outgrew the limit (413 answered)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, f"the request body is over the server's limit of {self.max_bytes} bytes", "payload_too_large")

    async def _give_up(self, send: Send) -> None:
        """The body did not come: 503 when shutdown began meanwhile, else 408."""
        if self.shutdown.begun.reached:
            return await send_shutting_down(send)
        message = f"the request body did not arrive within {self.read_timeout:g} s (--body-read-timeout)"
        await send_error(send, 408, message, "request_timeout", headers=(CLOSE,))


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
