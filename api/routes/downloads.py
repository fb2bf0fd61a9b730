"""``/jobs/{id}/adapter/url``: a short-lived presigned link to the adapter (S3/MinIO storage)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentOwner, SessionDep, SettingsDep, StorageDep
from shared.schemas import AdapterUrl
from shared.services import downloads

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}/adapter/url",
    response_model=AdapterUrl,
    responses={
        404: {"description": "No such job of yours."},
        409: {
            "description": "The job has not succeeded (`adapter_not_ready`), or storage is "
            "local and has no direct URLs (`direct_download_unavailable`: use "
            "`GET /jobs/{id}/adapter`)."
        },
    },
)
def adapter_url(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> AdapterUrl:
    """A presigned GET URL for the adapter .tar.gz, valid for a few minutes (no key needed)."""
    url, expires_at = downloads.adapter_url(
        session, storage, owner.owner, job_id, settings.adapter_url_expires_seconds
    )
    return AdapterUrl(url=url, expires_at=expires_at)
