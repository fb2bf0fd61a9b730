"""Adapter downloads: the succeeded job's archive, through the API or a presigned storage URL.

A presigned URL lets a large adapter go straight from S3/MinIO to the client without passing
through the API process, yet it is a bearer secret of its own: anyone holding it can download.
Its life is therefore short (``LORAFLEET_ADAPTER_URL_EXPIRES_SECONDS``, 300 s by default) and it
is only handed to the job's owner. Local storage has no such URL: its adapters go through the
authenticated ``GET /jobs/{id}/adapter``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from shared.errors import Conflict
from shared.models import Job, utcnow
from shared.services.jobs import get_job
from shared.states import SUCCEEDED
from shared.storage import Storage


def ready_adapter(session: Session, owner: str, job_id: str) -> Job:
    """The owner's job if its adapter exists; NotFound for another owner, Conflict until then."""
    job = get_job(session, owner, job_id)
    if job.deleted_at is not None:
        raise Conflict(
            f"job {job_id} was deleted ({job.deleted_at:%Y-%m-%d %H:%M} UTC); its adapter is gone",
            code="job_deleted",
        )
    if job.status != SUCCEEDED.value or not job.adapter_key:
        raise Conflict(
            f"job {job_id} is {job.status}; its adapter exists once it has succeeded",
            code="adapter_not_ready",
        )
    return job


def adapter_url(
    session: Session, storage: Storage, owner: str, job_id: str, expires_s: int
) -> tuple[str, datetime]:
    """A presigned URL for the adapter and when it expires; Conflict where storage has none."""
    job = ready_adapter(session, owner, job_id)
    assert job.adapter_key is not None
    expires_at = utcnow() + timedelta(seconds=expires_s)
    url = storage.presigned_url(job.adapter_key, expires_s)
    if url is None:
        raise Conflict(
            "this server keeps adapters in local storage, which has no direct download URLs; "
            f"download the adapter through the API: GET /jobs/{job_id}/adapter",
            code="direct_download_unavailable",
        )
    return url, expires_at
