"""The OpenAPI document, made to teach: bearer auth, real error bodies with examples, uploads.

FastAPI's generated document describes 422 with its own ``HTTPValidationError`` (``detail`` a
list) while lorafleet answers ``{"detail": str, "error": {"code", "message", "param"}}``
(``api/errors.py``), and ``/v1`` answers OpenAI's ``{"error": {...}}`` with 400 for invalid input.
It also leaves out 401/404 and has no examples. ``install`` patches the generated document once:

- every operation that needs a key gets the ``bearerAuth`` scheme (Swagger UI's Authorize
  button) and a 401 with the real body;
- every operation with a path id gets a 404, every operation with parameters or a body a 422
  (400 under ``/v1``), each with an example of the real body; routes add their own 409s etc.
  through ``error_doc``;
- error responses all point at one ``Error`` schema.

Request body examples live on the request models themselves (``json_schema_extra``), so the
document and the validation can never disagree about field names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

BEARER = "bearerAuth"

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "detail": {"type": "string", "description": "Human-readable message (native routes)."},
        "error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "code": {"type": ["string", "null"], "description": "Reason programs switch on."},
                "message": {"type": "string", "description": "Human-readable message."},
                "param": {"type": ["string", "null"], "description": "The field at fault."},
                "type": {
                    "type": "string",
                    "description": "OpenAI's error class (`/v1` routes only).",
                },
            },
        },
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Every validation problem (native 422 only).",
        },
    },
}

_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

# One typical body per status, used where a route documents nothing more specific.
_GENERIC: dict[int, tuple[str, str, str | None, str]] = {
    400: ("invalid_request", "training_file: Field required", "training_file", "Invalid input."),
    401: (
        "unauthorized",
        "missing API key: send 'Authorization: Bearer <key>'",
        None,
        "No key, or a key that is unknown or revoked.",
    ),
    403: ("forbidden", "this needs an admin API key", None, "The key may not do this."),
    404: (
        "not_found",
        "no job ftjob-0123456789abcdef01234567",
        "job_id",
        "No such object of yours.",
    ),
    409: (
        "conflict",
        "job ftjob-0123456789abcdef01234567 is running; its adapter exists once it has succeeded",
        None,
        "The request clashes with the object's state.",
    ),
    413: ("too_large", "JSON body is larger than the limit of 1048576 bytes", None, "Too large."),
    429: (
        "quota_exceeded",
        "you already have 50 queued or running jobs (limit 50)",
        None,
        "Quota.",
    ),
    422: (
        "invalid_request",
        "training.learning_rate: Input should be less than or equal to 1",
        "training.learning_rate",
        "The request names a field that is missing or out of range.",
    ),
}


def error_body(
    status: int, code: str, message: str, param: str | None = None, openai: bool = False
) -> dict[str, Any]:
    """The body the server really sends for this error (native, or OpenAI's under ``/v1``)."""
    if openai:
        kind = _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    body: dict[str, Any] = {
        "detail": message,
        "error": {"code": code, "message": message, "param": param},
    }
    if status == 422:
        body["errors"] = [{"loc": ["body", *(param or "body").split(".")], "msg": message}]
    return body


def error_doc(
    status: int, code: str, message: str, description: str, param: str | None = None
) -> dict[int | str, dict[str, Any]]:
    """A ``responses=`` entry for a route: the status, what it means, and an example body."""
    return {
        status: {
            "description": description,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"},
                    "example": error_body(status, code, message, param),
                }
            },
        }
    }


def _set_error(op: dict[str, Any], status: int, openai: bool, keep_description: bool) -> None:
    code, message, param, description = _GENERIC[status]
    responses = op.setdefault("responses", {})
    entry = responses.setdefault(str(status), {"description": description})
    if not keep_description or not entry.get("description"):
        entry["description"] = description
    content = entry.setdefault("content", {}).setdefault("application/json", {})
    content["schema"] = {"$ref": "#/components/schemas/Error"}
    if "example" not in content:
        content["example"] = error_body(status, code, message, param, openai)


def _needs_key(op: dict[str, Any]) -> bool:
    return any(
        BEARER in requirement or "HTTPBearer" in requirement
        for requirement in op.get("security", [])
    )


def _patch(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    security = components.setdefault("securitySchemes", {})
    security.pop("HTTPBearer", None)
    security[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `lorafleet keys create --owner NAME` (starts with `lf-`).",
    }
    for path, item in schema.get("paths", {}).items():
        openai = path.startswith("/v1/")
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = op.setdefault("responses", {})
            if _needs_key(op):
                op["security"] = [{BEARER: []}]
                _set_error(op, 401, openai, keep_description=False)
            if "{" in path:
                _set_error(op, 404, openai, keep_description=True)
            if "422" in responses:
                if openai:
                    responses["400"] = responses.pop("422")
                    _set_error(op, 400, openai, keep_description=False)
                else:
                    _set_error(op, 422, openai, keep_description=False)
            for status, entry in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                content = entry.setdefault("content", {}).setdefault("application/json", {})
                example = content.get("example")
                if isinstance(example, dict) and "error" not in example:
                    continue  # a documented non-error body (e.g. /readyz's 503)
                content.setdefault("schema", {"$ref": "#/components/schemas/Error"})
                if example is None and int(status) in _GENERIC:
                    code, message, param, _ = _GENERIC[int(status)]
                    content["example"] = error_body(int(status), code, message, param, openai)
    return schema


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the patched document (built once, then cached)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _patch(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
