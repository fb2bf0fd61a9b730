"""Stored adapters by name: the one resolver from a name a user gives to an adapter in storage.

Two features take an adapter by name: inference (a request's ``model``) and training
(``training.init_adapter``, the adapter a job starts from). Both accept the same names and follow
the same rules, decided here once:

- a succeeded job's ``fine_tuned_model`` (``ft:...:<job id>``) or its bare job id: the final
  adapter, ``jobs/<id>/adapter.tar.gz``, checked against the job's ``adapter_sha256``; a job that
  has not succeeded has none yet (``not_ready``);
- a checkpoint name (``...:ckpt-step-N``): that checkpoint's folder, checked against the digest
  recorded when the lease holder committed it; any job's committed checkpoint qualifies, a
  running or failed one's too (the point of checkpoints);
- tenancy: the job is looked up under the caller, so another owner's adapter is as missing as
  one that never existed; a deleted job's adapter is gone.

Callers map :class:`AdapterUnavailable` to their own error shape (OpenAI's ``model_not_found``
on ``/v1``, a 422 naming ``training.init_adapter`` at submit, an input error on the worker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.model_names import JOB_ID, parse_model_name
from shared.models import Checkpoint, Job
from shared.states import SUCCEEDED

__all__ = ["Adapter", "AdapterUnavailable", "StoredAdapter", "is_adapter_name", "locate_adapter"]

_BARE_JOB = re.compile(rf"^{JOB_ID}$")


@dataclass(frozen=True)
class Adapter:
    """Where an adapter lives in storage and how to check it."""

    id: str  # job id, or ``<job id>-step-<N>`` for a checkpoint
    key: str  # the final adapter's .tar.gz, or a checkpoint's folder prefix
    sha256: str
    layout: str  # "archive" (the final .tar.gz) or "folder" (a checkpoint's loose files)


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter a name resolved to, with the job that trained it."""

    job: Job
    step: int | None  # None: the job's final adapter
    adapter: Adapter


class AdapterUnavailable(Exception):
    """The name resolves to no usable adapter of the caller; ``reason`` says which case:
    ``not_a_name``, ``unknown``, ``deleted``, ``no_checkpoint`` or ``not_ready``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def is_adapter_name(name: str) -> bool:
    """Whether ``name`` is shaped like an adapter reference (not necessarily an existing one)."""
    return bool(_BARE_JOB.match(name)) or parse_model_name(name) is not None


def locate_adapter(session: Session, owner: str, name: str) -> StoredAdapter:
    """The owner's stored adapter ``name`` means; AdapterUnavailable saying why otherwise."""
    if _BARE_JOB.match(name):
        job_id, step = name, None
    else:
        parsed = parse_model_name(name)
        if parsed is None:
            raise AdapterUnavailable(
                f"{name!r} is not a job id (ftjob-...), a fine-tuned model name (ft:...) or a "
                "checkpoint name (ft:...:ckpt-step-N)",
                "not_a_name",
            )
        job_id, step = parsed.job_id, parsed.step
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.owner != owner:
        raise AdapterUnavailable(f"there is no job {job_id} of yours", "unknown")
    if job.deleted_at is not None:
        raise AdapterUnavailable(f"job {job_id} was deleted with its adapter", "deleted")
    if step is not None:
        row = session.scalar(
            select(Checkpoint).where(
                Checkpoint.job_id == job_id,
                Checkpoint.step == step,
                Checkpoint.sha256.is_not(None),
            )
        )
        if row is None or row.sha256 is None:
            kept = session.scalars(
                select(Checkpoint.step)
                .where(Checkpoint.job_id == job_id, Checkpoint.sha256.is_not(None))
                .order_by(Checkpoint.step)
            ).all()
            raise AdapterUnavailable(
                f"job {job_id} keeps no checkpoint at step {step} (kept: "
                f"{', '.join(map(str, kept)) or 'none'})",
                "no_checkpoint",
            )
        adapter = Adapter(f"{job_id}-step-{step}", row.storage_key, row.sha256, "folder")
        return StoredAdapter(job, step, adapter)
    if job.status != SUCCEEDED.value or not job.adapter_key or not job.adapter_sha256:
        raise AdapterUnavailable(
            f"job {job_id} is {job.status}; its adapter exists once the job has succeeded (a "
            "checkpoint name from /v1/fine_tuning/jobs/{id}/checkpoints works before that)",
            "not_ready",
        )
    return StoredAdapter(job, None, Adapter(job_id, job.adapter_key, job.adapter_sha256, "archive"))
