"""Fixtures for the security tests: two tenants and an admin, and a finished job of alice's.

Everything goes through the real services and the real database (SQLite and PostgreSQL, from
``tests/conftest.py``). The one shortcut: a job is marked succeeded by writing its row and its
artifacts the way the worker records them, since training a model has nothing to do with who may
read the result.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from shared.config import Settings
from shared.db import session_factory
from shared.models import Checkpoint, Job, JobEvent, JobMetric, utcnow
from shared.services.keys import create_key
from shared.storage import Storage
from tests.conftest import CHAT_ROWS, jsonl


@dataclass
class Tenants:
    """Keys of two ordinary owners and one admin, and alice's objects."""

    alice: dict[str, str]
    bob: dict[str, str]
    admin: dict[str, str]
    file_id: str
    job_id: str
    finished_job_id: str


def bearer(key: str) -> dict[str, str]:
    """Authorization headers for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def finish_job(storage: Storage, job_id: str) -> None:
    """Record ``job_id`` as succeeded with an adapter, a checkpoint, a metric and an event."""
    adapter = b"not really a tar.gz, but bytes only alice may read"
    storage.put_stream(f"adapters/{job_id}.tar.gz", io.BytesIO(adapter))
    prefix = f"checkpoints/{job_id}/step_1"
    storage.put_stream(f"{prefix}/adapter_config.json", io.BytesIO(b"{}"))
    storage.put_stream(f"{prefix}/adapter_model.safetensors", io.BytesIO(b"secret"))
    with session_factory()() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status = "succeeded"
        job.started_at = job.finished_at = utcnow()
        job.adapter_key = f"adapters/{job_id}.tar.gz"
        job.adapter_sha256 = hashlib.sha256(adapter).hexdigest()
        job.adapter_bytes = len(adapter)
        job.manifest = {"files": {}, "dataset_sha256": "alice-secret"}
        s.add(Checkpoint(job_id=job_id, step=1, storage_key=prefix, sha256="0" * 64))
        s.add(JobMetric(job_id=job_id, step=1, train_loss=1.5))
        s.add(JobEvent(job_id=job_id, level="info", message="alice-private event"))
        s.commit()


@pytest.fixture
def tenants(client: Any, settings: Settings, storage: Storage) -> Tenants:
    """alice (the ``client`` fixture's key), bob, an admin; alice owns a file and two jobs."""
    with session_factory()() as s:
        bob, _ = create_key(s, "bob")
        admin, _ = create_key(s, "root", admin=True)
    alice = {"Authorization": client.headers["Authorization"]}
    upload = client.post("/files", files={"file": ("alice.jsonl", jsonl(CHAT_ROWS))})
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    body = {"base_model": "tiny", "training_file": file_id, "training": {"max_steps": 2}}
    job_id = client.post("/jobs", json=body).json()["id"]
    finished = client.post("/jobs", json=body).json()["id"]
    finish_job(storage, finished)
    return Tenants(alice, bearer(bob), bearer(admin), file_id, job_id, finished)


def stored_objects(storage: Storage) -> list[str]:
    """Every key in storage (what a rejected upload must not add to)."""
    return storage.list("")


@pytest.fixture
def snapshot(storage: Storage) -> Callable[[], tuple[list[str], int]]:
    """(storage keys, file rows): compare before and after a rejected request."""
    from sqlalchemy import func, select

    from shared.models import File

    def take() -> tuple[list[str], int]:
        with session_factory()() as s:
            rows = s.scalar(select(func.count()).select_from(File)) or 0
        return stored_objects(storage), rows

    return take


def dumps(value: Any) -> str:
    """Compact JSON (for searching a response for leaked values)."""
    return json.dumps(value, separators=(",", ":"))
