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


def _status_of(exc: LorafleetError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


async def _domain(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LorafleetError)
    status = _status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, exc.message, exc.code, exc.param, headers)


def _loc(loc: tuple[Any, ...]) -> str:
    # Drop the "body"/"query" prefix: clients know where they sent it, they want the field.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path") else loc
    return ".".join(str(p) for p in parts) or "body"


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    message = "; ".join(f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors)
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return error_response(422, message, "invalid_request", param, errors=details)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, message, code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log only: a 500 body names no file, query or setting.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


# What every 4xx/5xx body looks like, for the OpenAPI page. FastAPI documents 422 as its own
# ``HTTPValidationError`` (``detail`` a list); ours is the shape above, the ``/v1`` routes answer
# OpenAI's (``error`` alone), so the documented schema is what both have in common.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "detail": {"type": "string", "description": "Human-readable message."},
        "error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "code": {"type": ["string", "null"], "description": "Reason programs switch on."},
                "message": {"type": "string", "description": "Human-readable message."},
                "param": {"type": ["string", "null"], "description": "The field at fault."},
            },
        },
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Every validation problem (422 only).",
        },
    },
}


def _document_error_shape(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # caches itself in app.openapi_schema: patched once
        components = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in components:
            components["HTTPValidationError"] = ERROR_SCHEMA
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` and document the error body they produce."""
    _document_error_shape(app)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(LorafleetError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
