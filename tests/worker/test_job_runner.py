"""The runner's checkpoint handling against the real database and storage (no training needed):
commits are fenced, resume verifies digests and falls back, a stale upload is never used."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.model_names import checkpoint_model_name
from shared.services import jobs, runs
from shared.services.runs import Lease
from shared.spec import JobSpec
from shared.storage import Storage
from worker.job_runner import InputError, JobRunner, _Upload, attempt_dir


def _checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 1000)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


def _claim(session: Session, job_id: str, worker: str) -> Lease:
    job = runs.claim_job(session, job_id, worker, 30)
    assert job is not None
    return Lease.of(job)


def test_resume_skips_a_corrupt_checkpoint(
    session: Session,
    settings: Settings,
    storage: Storage,
    make_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    job = make_job()
    first = JobRunner(_claim(session, job.id, "w1"), 1, settings)
    for step in (5, 10):
        first.outbox.uploads.append(_Upload(step, _checkpoint(tmp_path / f"s{step}", step), {}))
    assert first.outbox.pump(force=True)
    rows = runs.committed_checkpoints(session, job.id)
    assert [(r.step, r.epoch) for r in rows] == [(10, 1), (5, 1)]
    assert all("-e1/" in r.storage_key for r in rows)
    # The newest checkpoint is torn in storage (a byte flipped after the commit).
    key = rows[0].storage_key + "adapter_model.safetensors"
    storage.put_stream(key, io.BytesIO(b"\0" * 10))
    assert runs.release_job(session, first.lease, 10)
    second = JobRunner(_claim(session, job.id, "w2"), 1, settings)
    second.work.mkdir(parents=True)
    found = second._fetch_checkpoint()
    assert found is not None and found[1] == 5
    assert (found[0] / "state.json").read_text() == json.dumps({"step": 5})
    assert second.outbox.pump(force=True)
    messages = [e.message for e in jobs.list_events(session, "alice", job.id)]
    assert any("checkpoint at step 10 is unusable" in m and "step 5" in m for m in messages)
    assert second.work != first.work and second.work.parent == first.work.parent


def test_a_stale_upload_is_never_committed(
    session: Session,
    settings: Settings,
    storage: Storage,
    make_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    job = make_job()
    stale = JobRunner(_claim(session, job.id, "w1"), 1, settings)
    assert runs.release_job(session, stale.lease, None)  # the job moved on meanwhile
    live = _claim(session, job.id, "w2")
    stale.outbox.uploads.append(_Upload(20, _checkpoint(tmp_path / "late", 20), {}))
    assert not stale.outbox.pump(force=True)
    assert stale.outbox.lost
    assert runs.committed_checkpoints(session, job.id) == []
    assert storage.list(f"jobs/{job.id}/checkpoints/") == []  # its objects were removed
    assert attempt_dir(settings.data_dir, live).name == "w2-2"


def test_init_adapter_is_fetched_verified(
    session: Session,
    settings: Settings,
    storage: Storage,
    make_job: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A job starting from an earlier job's checkpoint gets its peft files only after the digest
    recorded at commit matches (the inference server's own check); a torn one is refused with
    the field named, not loaded."""
    parent = make_job()
    runner = JobRunner(_claim(session, parent.id, "w1"), 1, settings)
    folder = _checkpoint(tmp_path / "s4", 4)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    runner.outbox.uploads.append(_Upload(4, folder, {}))
    assert runner.outbox.pump(force=True)
    name = checkpoint_model_name("tiny", "alice", None, parent.id, 4)
    child = make_job(training={"max_steps": 2, "init_adapter": name})
    spec = JobSpec.model_validate(child.spec)
    starter = JobRunner(_claim(session, child.id, "w2"), 1, settings)
    starter.work.mkdir(parents=True)
    fetched = starter._fetch_init_adapter(spec)
    assert fetched is not None
    assert sorted(p.name for p in fetched.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (fetched / "adapter_model.safetensors").read_bytes() == bytes([4]) * 1000
    row = runs.committed_checkpoints(session, parent.id)[0]
    storage.put_stream(row.storage_key + "adapter_model.safetensors", io.BytesIO(b"\0" * 10))
    with pytest.raises(InputError) as caught:
        starter._fetch_init_adapter(spec)
    assert "training.init_adapter" in str(caught.value) and "does not match" in str(caught.value)
