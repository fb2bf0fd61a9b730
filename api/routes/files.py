"""``/files``: upload (streamed, size-limited while it arrives), read, list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from api.deps import CurrentOwner, SessionDep, StorageDep
from api.openapi import error_doc
from api.uploads import MULTIPART_BODY, upload_dataset
from shared.schemas import FileList, FileObject
from shared.services import files as file_service

router = APIRouter(tags=["files"])


@router.post(
    "/files",
    status_code=201,
    response_model=FileObject,
    openapi_extra={"requestBody": MULTIPART_BODY},
    responses={
        200: {"description": "A replay of an earlier upload with the same Idempotency-Key."},
        **error_doc(
            409,
            "idempotency_key_reused",
            "Idempotency-Key was already used with a different file",
            "The Idempotency-Key was used for another file.",
            "Idempotency-Key",
        ),
        **error_doc(
            413,
            "too_large",
            "file is larger than the limit of 536870912 bytes",
            "Too large.",
            "file",
        ),
        **error_doc(
            422,
            "invalid_file",
            "invalid dataset: line 3: messages[1].role must be one of system, user, assistant, "
            "tool",
            "The dataset is not valid; the message names the line.",
            "file",
        ),
    },
)
async def upload_file(
    request: Request,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FileObject:
    """Upload a JSONL dataset (field ``file``, optional ``purpose``); validated before storing.

    Uploading bytes you already uploaded (same sha256 and purpose) answers with that file (201,
    as any successful upload) instead of storing a second copy; a replay of the same
    ``Idempotency-Key`` answers 200.
    """
    row, created = await upload_dataset(request, owner.owner, session, storage, idempotency_key)
    if not created and idempotency_key:
        response.status_code = 200
    return FileObject.model_validate(row)


@router.get("/files", response_model=FileList)
def list_files(
    owner: CurrentOwner,
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> FileList:
    """The caller's files, newest first; pass the last id of a page as ``after``."""
    rows, has_more = file_service.list_files(session, owner.owner, purpose, limit, after)
    return FileList(data=[FileObject.model_validate(r) for r in rows], has_more=has_more)


@router.get("/files/{file_id}", response_model=FileObject)
def get_file(file_id: str, owner: CurrentOwner, session: SessionDep) -> FileObject:
    """One of the caller's files."""
    return FileObject.model_validate(file_service.get_file(session, owner.owner, file_id))


@router.delete(
    "/files/{file_id}",
    response_model=FileObject,
    responses=error_doc(
        409,
        "file_in_use",
        "file file-0123456789abcdef01234567 is used by ftjob-0123456789abcdef01234567 (queued or "
        "running); cancel the job or wait until it ends, then delete the file",
        "A queued or running job uses the file.",
        "file_id",
    ),
)
def delete_file(
    file_id: str, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> FileObject:
    """Delete a file (its bytes too); refused while a queued or running job uses it."""
    row = file_service.delete_file(session, storage, owner.owner, file_id)
    return FileObject.model_validate(row)
