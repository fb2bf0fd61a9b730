"""One place where domain errors become HTTP responses.

Every error body has the same shape: ``{"detail": message, "error": {"code", "message",
"param"}}``. ``detail`` keeps FastAPI's conventional key (a string here, so clients print it as is);
``error`` is what programs switch on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LorafleetError,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

STATUS: dict[type[LorafleetError], int] = {
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    InvalidInput: 422,
    QuotaExceeded: 429,
    Unauthorized: 401,
    Forbidden: 403,
    Unavailable: 503,
}


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The common error body."""
    body = {"detail": message, "error": {"code": code, "message": message, "param": param}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def status_of(exc: LorafleetError, invalid_input: int = 422) -> int:
    """The HTTP status of a domain error (``invalid_input``: 422 natively, 400 under ``/v1``)."""
    if isinstance(exc, InvalidInput):
        return invalid_input
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


async def _domain(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LorafleetError)
    status = status_of(exc)
    return error_response(status, exc.message, exc.code, exc.param, error_headers(exc, status))


def field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    """A validation error's location as the dotted field name (``training.max_steps``)."""
    # Drop the "body"/"query" prefix: clients know where they sent it, they want the field.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path") else loc
    return ".".join(str(p) for p in parts) or "body"


def validation_problem(exc: RequestValidationError) -> tuple[str, str, list[dict[str, Any]]]:
    """(param of the first problem, one message naming every field, the problems as a list)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = field_of(tuple(first.get("loc", ())))
    message = "; ".join(f"{field_of(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors)
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return param, message or "invalid request", details


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    param, message, details = validation_problem(exc)
    return error_response(422, message, "invalid_request", param, errors=details)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, message, code, headers=exc.headers)


DATABASE_RETRY_SECONDS = 2


def database_down(exc: Exception) -> Unavailable | None:
    """A lost or refused database connection (a restart, a failover) as the 503 a client can act
    on, not a 500; None for any other error. The pool reconnects on the next request
    (``pool_pre_ping``). Used by the app-wide handler and by ``/v1``'s OpenAI-shaped routes."""
    lost = isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
    if not lost:
        return None
    log.warning("database unreachable: %s", getattr(exc, "orig", exc))
    return Unavailable(
        "the database is unreachable right now; retry in a few seconds (a POST with an "
        "Idempotency-Key is safe to repeat)",
        code="database_unavailable",
    )


def error_headers(exc: LorafleetError, status: int) -> dict[str, str] | None:
    """Headers a domain error's response carries: how to authenticate, when to retry."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if exc.code == "database_unavailable":
        return {"Retry-After": str(DATABASE_RETRY_SECONDS)}
    return None


async def _database(request: Request, exc: Exception) -> JSONResponse:
    domain = database_down(exc)
    if domain is None:
        return await _unexpected(request, exc)
    return await _domain(request, domain)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log only: a 500 body names no file, query or setting.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (``api.openapi`` documents the bodies they produce)."""
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(LorafleetError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
