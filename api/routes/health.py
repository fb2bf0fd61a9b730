"""Liveness and readiness probes.

``/healthz`` answers whenever the process serves HTTP. ``/readyz`` also proves the database and
the broker answer, each with a short timeout, so a load balancer stops sending jobs to an API
that could not record or publish them.

``/readyz`` is public (load balancers send no key), so it says only which dependency is down,
never why: an exception text can carry a host name, a user name or a file path. The reason goes
to the server log, and to a caller presenting an admin key (``details``).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from shared.config import get_settings
from shared.db import get_engine, session_factory
from shared.queueing import broker_options
from shared.services.keys import authenticate

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

TIMEOUT_S = 2.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check_database() -> str | None:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_broker() -> str | None:
    settings = get_settings()
    try:
        with Connection(
            settings.broker_url,
            transport_options=broker_options(settings),
            connect_timeout=TIMEOUT_S,
        ) as connection:
            connection.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _is_admin(authorization: str | None) -> bool:
    """Whether the caller presented a live admin key (never raises: the probe is public)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:
        with session_factory()() as session:
            key = authenticate(session, token.strip())
            return key is not None and key.admin
    except Exception:
        return False


READY_EXAMPLE = {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
NOT_READY_EXAMPLE = {"status": "unavailable", "checks": {"database": "ok", "broker": "unavailable"}}


@router.get(
    "/readyz",
    responses={
        200: {"content": {"application/json": {"example": READY_EXAMPLE}}},
        503: {
            "description": "Database or broker unreachable (which one, not why; admins also "
            "get `details`).",
            "content": {"application/json": {"example": NOT_READY_EXAMPLE}},
        },
    },
)
def readyz(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Database and broker reachable: 200; otherwise 503 naming what is down (not why)."""
    checks: dict[str, str] = {}
    details: dict[str, Any] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        problem = check()
        checks[name] = "ok" if problem is None else "unavailable"
        if problem is not None:
            log.warning("readiness: %s unavailable: %s", name, problem)
            details[name] = problem
    ready = not details
    body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "checks": checks}
    if details and _is_admin(authorization):
        body["details"] = details
    return JSONResponse(body, status_code=200 if ready else 503)
