"""How the server answers failures: one map from prmserve's errors to HTTP statuses, the HTTP layer's own
errors, and one error body for everything (validation errors naming the field, unreadable bodies saying why)."""

from __future__ import annotations

import email.message
import json
import sys
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from prmserve.errors import (
    CheckpointError,
    EngineSleepingError,
    FormatError,
    HandleNotFoundError,
    InvalidInputError,
    PRMServeError,
    QueueFullError,
    RequestCancelledError,
)
from prmserve.server.middleware import RETRY_AFTER_S
from prmserve.server.protocol import ErrorResponse

# The one map from prmserve's errors to HTTP statuses (a subclass answers as its nearest listed base),
# registered as the app's exception handlers; the body's "type" is the error's class name.
ERROR_STATUS: dict[type[PRMServeError], int] = {
    InvalidInputError: 400,  # InputTooLongError too
    FormatError: 400,
    HandleNotFoundError: 404,
    QueueFullError: 429,
    RequestCancelledError: 503,
    EngineSleepingError: 503,
    CheckpointError: 500,
}
RETRY_LATER = (QueueFullError, RequestCancelledError, EngineSleepingError)  # answered with Retry-After


class APIError(Exception):
    """An error of the HTTP layer itself (auth, unknown model, client gone, timeout): its status, kind, field."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after


class FieldError(Exception):
    """A prmserve error caused by one request field: answered as `ERROR_STATUS` says, with `param` naming the field."""

    def __init__(self, error: PRMServeError, param: str) -> None:
        super().__init__(str(error))
        self.error, self.param = error, param


class BoundedIntRequest(Request):
    """A request whose JSON body parses integers longer than Python converts (4,300 digits) as a stand-in
    beyond every bound, so the field's validation refuses them by name (422) instead of the whole body (400)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_int=_json_int)
        return self._json


class BoundedIntRoute(APIRoute):
    """Routes that read their bodies through `BoundedIntRequest`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedIntRequest(request.scope, request.receive))

        return bounded


def _json_int(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    if not limit or len(text.lstrip("-")) <= limit:
        return int(text)
    beyond = 10**limit  # larger than any integer that has a decimal form here
    return -beyond if text.startswith("-") else beyond


def blamed(error: PRMServeError, param: str) -> FieldError:
    """`error` restated as about the field `param`, which its message names first."""
    return FieldError(type(error)(f"{param}: {error}"), param)


def add_error_handlers(app: FastAPI) -> None:
    """One error body for every failure: prmserve's errors (by `ERROR_STATUS`), API errors, validation errors
    naming the field, HTTP errors, the unexpected."""

    def respond(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        body = ErrorResponse(error={"message": message, "type": kind, "code": status, "param": param})
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return respond(exc.status, exc.message, exc.kind, exc.param, headers)

    def prmserve_error(error: PRMServeError, param: str | None) -> JSONResponse:
        status = next(ERROR_STATUS[c] for c in type(error).__mro__ if c in ERROR_STATUS)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(error, RETRY_LATER) else None
        return respond(status, str(error), type(error).__name__, param, headers)

    async def engine_error(request: Request, exc: PRMServeError) -> JSONResponse:
        return prmserve_error(exc, None)

    for error_class in ERROR_STATUS:
        app.add_exception_handler(error_class, engine_error)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError) -> JSONResponse:
        return prmserve_error(exc.error, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        unreadable = _unreadable_body(request.headers.get("content-type"), exc)
        if unreadable is not None:
            return respond(422, unreadable, "InvalidInputError")
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return respond(422, "; ".join(problems), "InvalidInputError", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(exc.status_code, str(exc.detail), "http_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return respond(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def _unreadable_body(content_type: str | None, exc: RequestValidationError) -> str | None:
    """What is wrong when the body could not be read as JSON at all: its Content-Type, or its syntax (where)."""
    errors = exc.errors()
    decode = next((e for e in errors if e["type"] == "json_invalid"), None)
    if decode is not None:
        position, document = decode["loc"][-1], exc.body if isinstance(exc.body, str) else ""
        line = document.count("\n", 0, position) + 1
        column = position - document.rfind("\n", 0, position)
        return f"the body is not valid JSON: {decode['ctx']['error']} at line {line} column {column}"
    if content_type and any(e["loc"][:1] == ("body",) for e in errors) and not _is_json(content_type):
        return f"the body must be JSON: send 'Content-Type: application/json' (got {content_type!r})"
    return None


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this type as JSON (application/json or application/*+json)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
