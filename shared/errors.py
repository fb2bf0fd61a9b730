"""Domain errors raised by ``shared`` and mapped to HTTP statuses in one place (``api/errors.py``).

Services never import FastAPI: they raise these, so the worker, the CLI and the API share one
vocabulary, and an HTTP status is decided once, not in every route.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every domain error; ``code`` is the machine-readable reason clients switch on."""

    code = "error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFound(LorafleetError):
    """The object does not exist, or belongs to another owner (indistinguishable on purpose)."""

    code = "not_found"


class Conflict(LorafleetError):
    """The request clashes with the object's state (idempotency key reuse, final job, ...)."""

    code = "conflict"


class InvalidInput(LorafleetError):
    """The request is well-formed but its content is wrong; ``param`` names the field."""

    code = "invalid_input"


class TooLarge(LorafleetError):
    """An upload or body exceeds a configured size limit."""

    code = "too_large"


class QuotaExceeded(LorafleetError):
    """The owner holds too many active objects (e.g. queued + running jobs)."""

    code = "quota_exceeded"


class Unauthorized(LorafleetError):
    """No credentials, or credentials that match no live API key."""

    code = "unauthorized"


class Forbidden(LorafleetError):
    """Valid credentials that may not do this (admin-only route, auth-disabled off loopback)."""

    code = "forbidden"


class Unavailable(LorafleetError):
    """A service the request needs is not running or not reachable (an inference server)."""

    code = "unavailable"
