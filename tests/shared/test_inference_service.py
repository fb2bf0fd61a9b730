"""Inference resolution (tenancy, job states, checkpoints, base models) and the server registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import Conflict, NotFound
from shared.models import Checkpoint, InferenceServer, utcnow
from shared.services import inference, runs
from shared.services.jobs import cancel_job

SHA = "ab" * 32


def _succeed(session: Session, job: Any) -> Any:
    assert runs.claim_job(session, job.id, "w1", 30) is not None
    lease = runs.Lease(job.id, "w1", 1)
    session.add(Checkpoint(job_id=job.id, step=2, storage_key=f"jobs/{job.id}/ckpt/", sha256=SHA))
    session.commit()
    runs.finish_job(
        session, lease, "succeeded", adapter_key=f"jobs/{job.id}/adapter.tar.gz", adapter_sha256=SHA
    )
    session.refresh(job)
    return job


def test_resolution_follows_tenancy_state_and_names(
    session: Session, settings: Settings, make_job: Callable[..., Any]
) -> None:
    job = _succeed(session, make_job())
    target = inference.resolve_model(session, "alice", job.fine_tuned_model, settings)
    assert target.base_model == "tiny" and target.adapter is not None
    assert (target.adapter.key, target.adapter.sha256, target.adapter.layout) == (
        f"jobs/{job.id}/adapter.tar.gz",
        SHA,
        "archive",
    )
    checkpoint = inference.resolve_model(
        session, "alice", f"{job.fine_tuned_model}:ckpt-step-2", settings
    )
    assert checkpoint.adapter is not None and checkpoint.adapter.layout == "folder"
    assert checkpoint.adapter.id == f"{job.id}-step-2"
    assert inference.resolve_model(session, "alice", "tiny", settings).adapter is None

    for owner, name in (
        ("bob", job.fine_tuned_model),  # another owner's model is missing, not forbidden
        ("alice", f"{job.fine_tuned_model}:ckpt-step-9"),
        ("alice", "no-such-model"),
        ("alice", "some-org/some-model"),  # a hub id is not installed here
    ):
        with pytest.raises(NotFound) as caught:
            inference.resolve_model(session, owner, name, settings)
        assert caught.value.code == "model_not_found" and caught.value.param == "model"

    queued = make_job()
    cancel_job(session, "alice", queued.id)
    with pytest.raises(Conflict) as conflict:
        inference.resolve_model(session, "alice", f"ft:tiny:alice::{queued.id}", settings)
    assert conflict.value.code == "model_not_ready" and "cancelled" in conflict.value.message

    names = [m.id for m in inference.model_listing(session, "alice", settings)]
    assert names == ["tiny", job.fine_tuned_model]
    assert [m.id for m in inference.model_listing(session, "bob", settings)] == ["tiny"]


def test_registry_prefers_live_servers_holding_the_base_model(
    session: Session, settings: Settings
) -> None:
    assert inference.candidates(session, settings, "tiny") == []
    for name in ("a", "b", "c"):
        inference.register_inference_server(
            session, name, f"http://{name}:1", "host", f"token-{name}", "cpu float32"
        )
    assert inference.heartbeat_inference_server(session, "b", ["tiny"], 3, busy=True)
    assert not inference.heartbeat_inference_server(session, "nobody", [], 0, busy=False)
    # "c" went silent for longer than 3 leases: it is offline, never a candidate.
    stale = utcnow() - timedelta(seconds=4 * settings.lease_seconds)
    session.execute(
        update(InferenceServer).where(InferenceServer.id == "c").values(last_heartbeat=stale)
    )
    session.commit()
    for _ in range(5):
        found = inference.candidates(session, settings, "tiny")
        assert [b.server_id for b in found] == ["b", "a"]
        assert found[0].token == "token-b" and found[0].url == "http://b:1"
    statuses = {
        row.id: status for row, status in inference.list_inference_servers(session, settings)
    }
    assert statuses == {"a": "idle", "b": "busy", "c": "offline"}
    inference.mark_inference_server_offline(session, "b")
    assert [b.server_id for b in inference.candidates(session, settings, "tiny")] == ["a"]

    external = settings.model_copy(
        update={"inference_url": "http://vllm:8000/", "inference_api_key": "k"}
    )
    assert inference.candidates(session, external, "tiny") == [
        inference.Backend("http://vllm:8000", "k", None)
    ]
