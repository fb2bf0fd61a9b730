"""One resolver of adapter names: inference's ``model`` and ``training.init_adapter`` accept and
refuse exactly the same names, for the same reasons."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import Conflict, InvalidInput, NotFound
from shared.model_names import checkpoint_model_name
from shared.models import Checkpoint
from shared.services import inference, runs
from shared.services.adapters import AdapterUnavailable, locate_adapter
from shared.services.init_adapters import find_adapter

SHA = "cd" * 32


def _claim(session: Session, job: Any) -> runs.Lease:
    assert runs.claim_job(session, job.id, "w1", 30) is not None
    return runs.Lease(job.id, "w1", 1)


def _both(session: Session, settings: Settings, owner: str, name: str) -> tuple[Any, Any]:
    """What inference and init_adapter make of ``name``: the adapter, or the error's class."""
    results: list[Any] = []
    for resolve in (
        lambda: inference.resolve_model(session, owner, name, settings).adapter,
        lambda: find_adapter(session, owner, name).adapter,
    ):
        try:
            results.append(resolve())
        except (NotFound, Conflict, InvalidInput) as exc:
            results.append(type(exc))
    return results[0], results[1]


def test_inference_and_init_adapter_resolve_names_alike(
    session: Session, settings: Settings, make_job: Callable[..., Any]
) -> None:
    failed = make_job()
    lease = _claim(session, failed)
    session.add_all(
        [
            Checkpoint(job_id=failed.id, step=4, storage_key=f"jobs/{failed.id}/c4/", sha256=SHA),
            # Saved but never committed by the lease holder: no digest, never used.
            Checkpoint(job_id=failed.id, step=6, storage_key=f"jobs/{failed.id}/c6/", sha256=None),
        ]
    )
    session.commit()
    runs.finish_job(session, lease, "failed", error_code="training_failed", error_message="boom")
    session.refresh(failed)

    def ckpt(step: int) -> str:
        return checkpoint_model_name("tiny", "alice", None, failed.id, step)

    # A failed job's committed checkpoint is usable by both (continue from where it got).
    served, started = _both(session, settings, "alice", ckpt(4))
    assert served == started and served.layout == "folder" and served.sha256 == SHA
    # Refused by both: an uncommitted checkpoint, the failed job's final adapter, another
    # owner's checkpoint.
    assert _both(session, settings, "alice", ckpt(6)) == (NotFound, InvalidInput)
    assert _both(session, settings, "alice", failed.id) == (Conflict, InvalidInput)
    assert _both(session, settings, "bob", ckpt(4)) == (NotFound, InvalidInput)

    with pytest.raises(AdapterUnavailable) as caught:
        locate_adapter(session, "alice", ckpt(6))
    assert caught.value.reason == "no_checkpoint" and "kept: 4" in caught.value.message
    with pytest.raises(AdapterUnavailable) as caught:
        locate_adapter(session, "alice", "tiny")
    assert caught.value.reason == "not_a_name"
