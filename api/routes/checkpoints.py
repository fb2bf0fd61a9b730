"""``/jobs/{id}/checkpoints/{step}/adapter``: any saved step's adapter as one .tar.gz.

The listing itself (``GET /jobs/{id}/checkpoints``) lives with the other job routes. The archive
is assembled from storage into a temporary file (checkpoints are loose objects under a prefix)
and removed once the response is sent.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.deps import CurrentOwner, SessionDep, StorageDep
from shared.services import checkpoints as checkpoint_service

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}/checkpoints/{step}/adapter",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The adapter .tar.gz"},
        404: {"description": "Unknown job, or no checkpoint at that step."},
    },
)
def download_checkpoint_adapter(
    job_id: str, step: int, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> FileResponse:
    """The checkpoint's peft adapter (``adapter_config.json``, ``adapter_model.safetensors``,
    ``state.json``), loadable like the final adapter; optimizer state is left out."""
    checkpoint = checkpoint_service.get_checkpoint(session, owner.owner, job_id, step)
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-ckpt-"))
    try:
        archive = folder / f"{job_id}-step{step}-adapter.tar.gz"
        checkpoint_service.write_adapter_archive(storage, checkpoint, archive)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=archive.name,
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )
