"""Inference: which adapter a ``model`` name means for its caller, and which server answers.

Resolution (``resolve_model``) is where tenancy is decided: a fine-tuned name is parsed by
``shared.model_names`` and its job looked up *under the caller*, so another owner's model is
``model_not_found`` exactly like a missing one. The result names the base model and the adapter's
storage location with the checksum the server verifies before it loads a byte of it:

- a succeeded job's ``fine_tuned_model``: ``jobs/<id>/adapter.tar.gz``, checked against the job's
  ``adapter_sha256`` and then file by file against the ``manifest.json`` inside;
- a checkpoint name (``...:ckpt-step-N``): the checkpoint's folder, checked against the digest
  recorded when it was committed (the same ``folder_digest`` the worker computed);
- a base model name: no adapter.

The registry of ``lorafleet inference`` servers mirrors the worker registry
(``shared.services.fleet``): register at start, heartbeat, offline when silent for
``STALE_LEASES`` leases. ``candidates`` orders the live servers for a request: those already
holding its base model first, so a request does not make a second server load the same weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import Conflict, NotFound
from shared.model_names import parse_model_name
from shared.models import InferenceServer, Job, utcnow
from shared.services.adapters import Adapter, AdapterUnavailable, is_adapter_name, locate_adapter
from shared.services.base_models import list_base_models
from shared.services.checkpoints import get_checkpoint
from shared.services.fleet import locate_base_model, stale_after
from shared.services.jobs import get_job
from shared.services.transitions import rowcount
from shared.states import SUCCEEDED, WorkerStatus

# Headers the API adds to a request it proxies to a `lorafleet inference` server. The body stays
# OpenAI's own, so the same request works against vLLM (which ignores these headers).
HEADER_BASE = "X-Lorafleet-Base-Model"
HEADER_ADAPTER = "X-Lorafleet-Adapter"  # a stable id of the adapter (its cache name)
HEADER_KEY = "X-Lorafleet-Adapter-Key"  # storage key (a .tar.gz) or prefix (a checkpoint folder)
HEADER_SHA = "X-Lorafleet-Adapter-Sha256"
HEADER_LAYOUT = "X-Lorafleet-Adapter-Layout"  # "archive" | "folder"

__all__ = [
    "Adapter",
    "Backend",
    "HEADER_ADAPTER",
    "HEADER_BASE",
    "HEADER_KEY",
    "HEADER_LAYOUT",
    "HEADER_SHA",
    "Target",
    "candidates",
    "describe_model",
    "heartbeat_inference_server",
    "list_inference_servers",
    "mark_inference_server_offline",
    "model_listing",
    "register_inference_server",
    "resolve_model",
    "route_request",
]


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    model: str  # the name as the caller gave it (echoed in the answer)
    base_model: str
    adapter: Adapter | None

    def headers(self) -> dict[str, str]:
        """The headers that tell a `lorafleet inference` server what to load."""
        headers = {HEADER_BASE: self.base_model}
        if self.adapter is not None:
            headers.update(
                {
                    HEADER_ADAPTER: self.adapter.id,
                    HEADER_KEY: self.adapter.key,
                    HEADER_SHA: self.adapter.sha256,
                    HEADER_LAYOUT: self.adapter.layout,
                }
            )
        return headers


@dataclass(frozen=True)
class Backend:
    """An inference server to send a request to."""

    url: str
    token: str | None
    server_id: str | None  # None for LORAFLEET_INFERENCE_URL


def _not_found(name: str, why: str) -> NotFound:
    return NotFound(f"model {name!r} {why}", param="model", code="model_not_found")


def resolve_model(session: Session, owner: str, name: str, settings: Settings) -> Target:
    """The base model and adapter ``name`` means for ``owner``.

    ``model_not_found`` (404) for an unknown name or another owner's model; Conflict (409,
    ``model_not_ready``) for a job that has not succeeded yet. Adapter names follow
    ``shared.services.adapters`` (the same rules as ``training.init_adapter``).
    """
    if not is_adapter_name(name):
        try:
            where = locate_base_model(name, settings)
        except ValueError:
            where = None
        # Base models are called by name only when they are installed (the models directory or
        # its hub mirrors): a bare hub id would make an inference server download a model.
        if not isinstance(where, Path):
            raise _not_found(name, "does not exist (GET /v1/models lists yours)")
        return Target(name, name, None)
    try:
        found = locate_adapter(session, owner, name)
    except AdapterUnavailable as exc:
        if exc.reason == "not_ready":
            raise Conflict(exc.message, param="model", code="model_not_ready") from None
        raise _not_found(name, f"is not available: {exc.message}") from None
    return Target(name, found.job.base_model, found.adapter)


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``GET /v1/models``."""

    id: str
    created: int
    owned_by: str


def model_listing(session: Session, owner: str, settings: Settings) -> list[ModelEntry]:
    """Base models (owned by ``lorafleet``) and the caller's fine-tuned models, newest first."""
    entries: list[ModelEntry] = []
    models_dir = settings.models_path
    for info in list_base_models(settings):
        if info.error is not None:
            continue
        folder = Path(models_dir, info.id)
        created = int(folder.stat().st_mtime) if folder.exists() else 0
        entries.append(ModelEntry(info.id, created, "lorafleet"))
    jobs = session.scalars(
        select(Job)
        .where(Job.owner == owner, Job.status == SUCCEEDED.value, Job.deleted_at.is_(None))
        .order_by(Job.finished_at.desc(), Job.id.desc())
    )
    for job in jobs:
        name = job.fine_tuned_model
        if name and job.adapter_key:
            moment = job.finished_at or job.created_at
            entries.append(ModelEntry(name, int(moment.timestamp()), job.owner))
    return entries


def describe_model(session: Session, owner: str, name: str, settings: Settings) -> ModelEntry:
    """One model the caller may use (``GET /v1/models/{model}``); same errors as resolving it."""
    target = resolve_model(session, owner, name, settings)
    if target.adapter is None:
        for entry in model_listing(session, owner, settings):
            if entry.id == name:
                return entry
        return ModelEntry(name, 0, "lorafleet")  # an allowed hub id with no local copy
    ref = parse_model_name(name)
    assert ref is not None
    job = get_job(session, owner, ref.job_id)
    moment = job.finished_at or job.created_at
    if ref.step is not None:
        moment = get_checkpoint(session, owner, job.id, ref.step).created_at
    return ModelEntry(name, int(moment.timestamp()), job.owner)


def route_request(
    session: Session, owner: str, name: str, settings: Settings
) -> tuple[Target, list[Backend]]:
    """What ``name`` means for ``owner``, and the servers to ask, best first."""
    target = resolve_model(session, owner, name, settings)
    return target, candidates(session, settings, target.base_model)


# ---------------------------------------------------------------- the server registry
def register_inference_server(
    session: Session,
    server_id: str,
    url: str,
    hostname: str,
    token: str,
    device: str,
    version: str | None = None,
) -> InferenceServer:
    """Insert or refresh a server's record when it starts."""
    now = utcnow()
    row = session.get(InferenceServer, server_id, populate_existing=True) or InferenceServer(
        id=server_id
    )
    row.url = url
    row.hostname = hostname
    row.token = token
    row.device = device
    row.version = version
    row.base_models = []
    row.adapters = 0
    row.status = WorkerStatus.IDLE.value
    row.last_heartbeat = now
    row.started_at = now
    session.add(row)
    session.commit()
    return row


def heartbeat_inference_server(
    session: Session, server_id: str, base_models: list[str], adapters: int, busy: bool
) -> bool:
    """Record that the server lives and what it holds; False if it was never registered."""
    status = WorkerStatus.BUSY if busy else WorkerStatus.IDLE
    done = rowcount(
        session,
        update(InferenceServer)
        .where(InferenceServer.id == server_id)
        .values(
            last_heartbeat=utcnow(),
            base_models=sorted(base_models),
            adapters=adapters,
            status=status.value,
        ),
    )
    session.commit()
    return bool(done)


def mark_inference_server_offline(session: Session, server_id: str) -> None:
    """The server stopped cleanly: no request is sent to it any more."""
    rowcount(
        session,
        update(InferenceServer)
        .where(InferenceServer.id == server_id)
        .values(status=WorkerStatus.OFFLINE.value, base_models=[]),
    )
    session.commit()


def list_inference_servers(
    session: Session, settings: Settings
) -> list[tuple[InferenceServer, WorkerStatus]]:
    """Every registered server with its effective status (offline when silent too long)."""
    cutoff = utcnow() - timedelta(seconds=stale_after(settings))
    rows = session.scalars(
        select(InferenceServer)
        .order_by(InferenceServer.last_heartbeat.desc(), InferenceServer.id)
        .execution_options(populate_existing=True)
    )
    return [
        (row, WorkerStatus.OFFLINE if row.last_heartbeat < cutoff else WorkerStatus(row.status))
        for row in rows
    ]


def candidates(session: Session, settings: Settings, base_model: str) -> list[Backend]:
    """Where to send a request for ``base_model``, best first.

    ``LORAFLEET_INFERENCE_URL`` alone when set; otherwise the live registered servers, those
    already holding the base model first (in random order within each group, to spread load).
    """
    if settings.inference_url:
        return [Backend(settings.inference_url.rstrip("/"), settings.inference_api_key, None)]
    live = [
        row
        for row, status in list_inference_servers(session, settings)
        if status != WorkerStatus.OFFLINE
    ]
    random.shuffle(live)
    live.sort(key=lambda row: base_model not in (row.base_models or []))
    return [Backend(row.url, row.token, row.id) for row in live]
