"""The FastAPI app: wiring only. Routes live in ``api/routes``, logic in ``shared/services``.

``lorafleet serve`` runs ``uvicorn --factory api.main:create_app``. The lifespan migrates the
database to head (``prepare_database``) before the first request, so a fresh data directory or a
new release needs no separate migration step; concurrent starts on PostgreSQL serialise on an
advisory lock inside ``upgrade_to_head``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api import errors, openapi
from api.guards import HostileInputGuard
from api.routes import (
    checkpoints,
    docs,
    downloads,
    files,
    fleet,
    health,
    inference,
    jobs,
    keys,
    metrics,
    models,
    openai_compat,
    web,
)
from shared.config import get_settings
from shared.db import upgrade_to_head

DESCRIPTION = """Self-hosted LoRA fine-tuning. Upload a JSONL dataset (`POST /files`), check what a
job needs (`POST /estimate`), submit it (`POST /jobs`), follow it (`GET /jobs/{id}/events` with
`Accept: text/event-stream`), download the peft adapter (`GET /jobs/{id}/adapter`).

Authenticate with an API key (`lorafleet keys create --owner NAME`): press **Authorize** and paste
it. Every error answers `{"detail": message, "error": {"code", "message", "param"}}`; `param`
names the field to fix. The OpenAI fine-tuning API is served under `/v1` for the `openai` SDK, and
so is inference: `POST /v1/chat/completions` with `model` set to a job's `fine_tuned_model`."""


def prepare_database() -> None:
    """Bring the configured database to the newest schema (idempotent)."""
    upgrade_to_head(get_settings().db_url)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(prepare_database)
    yield


def create_app() -> FastAPI:
    """A new app instance (uvicorn factory mode; tests build one per settings)."""
    app = FastAPI(
        title="lorafleet",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by api.routes.docs from installed assets, not a CDN
        redoc_url=None,
    )
    errors.install(app)
    openapi.install(app)
    app.add_middleware(HostileInputGuard)
    for module in (health, metrics, files, jobs, fleet, models, keys):
        app.include_router(module.router)
    app.include_router(checkpoints.router)
    app.include_router(downloads.router)
    # Before the /v1 facade: its last route is a catch-all for unknown /v1 paths.
    app.include_router(inference.router)
    app.include_router(openai_compat.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    return app
