"""HTTP clients of a prmserve server: `Client` (blocking) and `AsyncClient`, returning the offline API's `ScoreResult`s.

Both send large batches in requests of `max_batch_items`, so a batch larger than the server's queue still
gets scored, and turn transport failures into prmserve errors that name the server's URL.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx

from prmserve import errors
from prmserve.errors import InvalidInputError, PRMServeError, QueueFullError, RequestCancelledError
from prmserve.results import ScoreResult, TokenUsage

RETRY_STATUSES = (429, 503)


class ServerError(PRMServeError):
    """The server answered with an error no more specific class describes; `status` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(ServerError):
    """The server wants an API key (`Authorization: Bearer`) and did not get the right one."""


class ConnectionFailedError(PRMServeError):
    """The server could not be reached (refused, unknown host) or dropped the connection."""


class ClientTimeoutError(RequestCancelledError):
    """The server did not answer within the client's `timeout`; the request was dropped."""


class _Retry:
    """Exponential backoff with jitter; the server's Retry-After wins when it sends one."""

    def __init__(self, max_retries: int, base: float = 0.1, cap: float = 10.0) -> None:
        self.max_retries, self.base, self.cap = max_retries, base, cap

    def delay(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before another try, or None to give up."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        backoff = min(self.cap, self.base * 2**attempt) * random.uniform(0.5, 1.0)
        try:
            return max(float(response.headers["retry-after"]), backoff)
        except (KeyError, ValueError):
            return backoff


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _score_bodies(
    items: Sequence[Mapping[str, Any]], max_items: int, priority: int, aggregate: str, timeout: float | None, keep: bool = False,
) -> Iterator[tuple[int, dict]]:
    """(first item's index, request body) of each request of at most `max_items` items; one request when empty."""
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise InvalidInputError("score() takes a list of items")
    for start in range(0, max(len(items), 1), max_items):
        chunk = [dict(item) for item in items[start : start + max_items]]
        yield start, {"items": chunk, "priority": priority, "aggregate": aggregate, "timeout": timeout, "keep": keep}


def _extend_bodies(
    handle: str, children: Sequence[Sequence[str]], max_items: int, priority: int, aggregate: str, timeout: float | None, keep: bool,
) -> Iterator[dict]:
    """/v1/extend bodies of at most `max_items` children each, all on the same node."""
    if isinstance(children, (str, Mapping)) or not isinstance(children, Sequence):
        raise InvalidInputError("extend() takes a list of children, each a list of new steps")
    for start in range(0, max(len(children), 1), max_items):
        chunk = [list(child) if isinstance(child, (list, tuple)) else child for child in children[start : start + max_items]]
        yield {"handle": handle, "children": chunk, "priority": priority, "aggregate": aggregate, "timeout": timeout, "keep": keep}


def _release_body(handles: str | Sequence[str]) -> dict:
    return {"handles": [handles] if isinstance(handles, str) else list(handles)}


def _located(exc: InvalidInputError, start: int, size: int, total: int) -> InvalidInputError:
    """The server counts items within one request: when the batch was split, say which items that request held."""
    if size == total:
        return exc
    return type(exc)(f"request of items {start}..{start + size - 1} of {total} (the server numbers them from 0): {exc}")


def _checked_batch_size(max_batch_items: int) -> int:
    if max_batch_items < 1:
        raise ValueError("max_batch_items must be >= 1")
    return max_batch_items


def _transport_error(exc: httpx.TransportError, url: str) -> PRMServeError:
    """A prmserve error for a failure below HTTP, naming the server it was talking to."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ClientTimeoutError(f"the prmserve server at {url} did not answer in time ({reason}); raise the client's timeout")
    return ConnectionFailedError(f"cannot reach the prmserve server at {url}: {reason}")


def _results(payload: dict) -> list[ScoreResult]:
    return [
        ScoreResult(list(r["step_rewards"]), TokenUsage(**r["usage"]), r.get("handle"),
                    [tuple(span) for span in r["step_spans"]] if r.get("step_spans") is not None else None)
        for r in payload["results"]
    ]


def _checked(response: httpx.Response) -> Any:
    """The JSON body of a success, else the typed error the server's answer describes."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        message, kind = str(error["message"]), str(error.get("type", ""))
    except (ValueError, KeyError, TypeError):
        message, kind = response.text or response.reason_phrase, ""
    raise _error(response.status_code, kind, message)


def _error(status: int, kind: str, message: str) -> PRMServeError:
    """The server's prmserve error class when it names one; else one chosen by status."""
    named = getattr(errors, kind, None)
    if isinstance(named, type) and issubclass(named, PRMServeError):
        return named(message)
    if status in (400, 413, 422):
        return InvalidInputError(message)
    if status == 429:
        return QueueFullError(message)
    if status == 504:
        return RequestCancelledError(message)
    if status == 401:
        return AuthenticationError(message, status)
    return ServerError(f"HTTP {status}: {message}", status)


class Client:
    """A blocking client: `score`, `extend`, `release`, `models`, `health`; retries on 429/503; a context manager."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 8, max_batch_items: int = 256,
    ) -> None:
        self.url = url
        self.max_batch_items = _checked_batch_size(max_batch_items)
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)
        self._retry = _Retry(max_retries)

    def score(
        self,
        items: Sequence[Mapping[str, Any]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[ScoreResult]:
        """Score items on the server, `max_batch_items` a request (each with its own `timeout`); results in item order.

        `keep=True` gives each result a `handle` for `extend`, as `PRM.score` does.
        """
        results: list[ScoreResult] = []
        for start, body in _score_bodies(items, self.max_batch_items, priority, aggregate, timeout, keep):
            try:
                results += _results(self._send("POST", "/v1/score", json=body))
            except InvalidInputError as exc:
                raise _located(exc, start, len(body["items"]), len(items)) from None
        return results

    def extend(
        self,
        handle: str,
        children: Sequence[Sequence[str]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[ScoreResult]:
        """Score children of a kept node (each a list of new steps), as `PRM.extend` does; one round trip
        per `max_batch_items` children."""
        results: list[ScoreResult] = []
        for body in _extend_bodies(handle, children, self.max_batch_items, priority, aggregate, timeout, keep):
            results += _results(self._send("POST", "/v1/extend", json=body))
        return results

    def release(self, handles: str | Sequence[str]) -> int:
        """Let kept nodes go; the number of handles that still existed."""
        return (self._send("POST", "/v1/release", json=_release_body(handles)))["released"]

    def models(self) -> list[dict[str, Any]]:
        """The served models (`[0]["id"]` is the name)."""
        return self._send("GET", "/v1/models")["data"]

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/health")

    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Put the server's engine to sleep (vLLM's `POST /sleep`); what it freed. Scoring meanwhile gets 503, which
        this client retries with backoff, so a score call waits for `wake_up` within its retries."""
        return self._send("POST", "/sleep", params={"level": level})

    def wake_up(self) -> None:
        """Wake the server's engine (vLLM's `POST /wake_up`)."""
        self._send("POST", "/wake_up")

    def is_sleeping(self) -> bool:
        return self._send("GET", "/is_sleeping")["is_sleeping"]

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.url) from exc
            wait = self._retry.delay(attempt, response)
            if wait is None:
                return _checked(response)
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of `Client`."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 8, max_batch_items: int = 256,
    ) -> None:
        self.url = url
        self.max_batch_items = _checked_batch_size(max_batch_items)
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)
        self._retry = _Retry(max_retries)

    async def score(
        self,
        items: Sequence[Mapping[str, Any]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[ScoreResult]:
        """Score items on the server, `max_batch_items` a request (each with its own `timeout`); results in item order.

        `keep=True` gives each result a `handle` for `extend`, as `PRM.score` does.
        """
        results: list[ScoreResult] = []
        for start, body in _score_bodies(items, self.max_batch_items, priority, aggregate, timeout, keep):
            try:
                results += _results(await self._send("POST", "/v1/score", json=body))
            except InvalidInputError as exc:
                raise _located(exc, start, len(body["items"]), len(items)) from None
        return results

    async def extend(
        self,
        handle: str,
        children: Sequence[Sequence[str]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
        keep: bool = False,
    ) -> list[ScoreResult]:
        """Score children of a kept node (each a list of new steps), as `PRM.extend` does; one round trip
        per `max_batch_items` children."""
        results: list[ScoreResult] = []
        for body in _extend_bodies(handle, children, self.max_batch_items, priority, aggregate, timeout, keep):
            results += _results(await self._send("POST", "/v1/extend", json=body))
        return results

    async def release(self, handles: str | Sequence[str]) -> int:
        """Let kept nodes go; the number of handles that still existed."""
        return (await self._send("POST", "/v1/release", json=_release_body(handles)))["released"]

    async def models(self) -> list[dict[str, Any]]:
        return (await self._send("GET", "/v1/models"))["data"]

    async def health(self) -> dict[str, Any]:
        return await self._send("GET", "/health")

    async def sleep(self, level: int = 1) -> dict[str, Any]:
        """As `Client.sleep`."""
        return await self._send("POST", "/sleep", params={"level": level})

    async def wake_up(self) -> None:
        await self._send("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        return (await self._send("GET", "/is_sleeping"))["is_sleeping"]

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.url) from exc
            wait = self._retry.delay(attempt, response)
            if wait is None:
                return _checked(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
