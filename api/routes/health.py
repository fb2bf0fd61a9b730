"""Liveness and readiness probes.

``/healthz`` answers whenever the process serves HTTP. ``/readyz`` also proves the database and
the broker answer, each with a short timeout, so a load balancer stops sending jobs to an API
that could not record or publish them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from shared.config import get_settings
from shared.db import get_engine
from shared.queueing import broker_options

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


@router.get("/readyz", responses={503: {"description": "database or broker unreachable"}})
def readyz() -> JSONResponse:
    """Database and broker reachable: 200; otherwise 503 naming what failed."""
    checks: dict[str, Any] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        problem = check()
        checks[name] = "ok" if problem is None else problem
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
