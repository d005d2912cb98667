"""HTTP clients of a prmserve server: `Client` (blocking) and `AsyncClient`, returning the offline API's `ScoreResult`s."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
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


def _score_body(items: Sequence[Mapping[str, Any]], priority: int, aggregate: str, timeout: float | None) -> dict:
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
        raise InvalidInputError("score() takes a list of items")
    return {"items": [dict(item) for item in items], "priority": priority, "aggregate": aggregate, "timeout": timeout}


def _results(payload: dict) -> list[ScoreResult]:
    return [ScoreResult(list(r["step_rewards"]), TokenUsage(**r["usage"])) for r in payload["results"]]


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
    """A blocking client: `score`, `models`, `health`; retries on 429/503; use it as a context manager."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 8) -> None:
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)
        self._retry = _Retry(max_retries)

    def score(
        self,
        items: Sequence[Mapping[str, Any]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score items on the server; results in item order, as `PRM.score` gives them."""
        return _results(self._send("POST", "/v1/score", json=_score_body(items, priority, aggregate, timeout)))

    def models(self) -> list[dict[str, Any]]:
        """The served models (`[0]["id"]` is the name)."""
        return self._send("GET", "/v1/models")["data"]

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/health")

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            response = self._http.request(method, path, **kwargs)
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

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 8) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)
        self._retry = _Retry(max_retries)

    async def score(
        self,
        items: Sequence[Mapping[str, Any]],
        priority: int = 0,
        aggregate: str = "min",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score items on the server; results in item order, as `PRM.score` gives them."""
        return _results(await self._send("POST", "/v1/score", json=_score_body(items, priority, aggregate, timeout)))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._send("GET", "/v1/models"))["data"]

    async def health(self) -> dict[str, Any]:
        return await self._send("GET", "/health")

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            response = await self._http.request(method, path, **kwargs)
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
