"""``/v1``: the OpenAI fine-tuning API, so the stock ``openai`` SDK drives lorafleet unchanged.

A facade, not a second implementation: every route calls the same ``shared.services`` as the
native routes and translates shapes with ``shared.openai_shapes``. Jobs and files have one id in
both APIs. Errors under ``/v1`` use OpenAI's body ``{"error": {"message", "type", "param",
"code"}}`` and statuses (invalid input is 400, not the native 422) because the SDK picks its
exception class from the status: that mapping lives in ``OpenAIRoute``, which wraps dependency
errors (auth) and body validation as well as the route body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import CurrentOwner, SessionDep, StorageDep
from api.errors import database_down, error_headers, status_of, validation_problem
from api.uploads import MULTIPART_BODY, upload_dataset
from shared.errors import LorafleetError, NotFound
from shared.model_names import parse_model_name
from shared.openai_shapes import (
    CheckpointOut,
    Deleted,
    FileOut,
    FineTuningJob,
    FineTuningJobCreate,
    JobEventOut,
    Page,
    checkpoint_to_openai,
    event_to_openai,
    job_to_openai,
    metric_to_openai,
    spec_from_openai,
)
from shared.services import files as file_service
from shared.services import jobs as job_service
from shared.services.openai_facade import checkpoint_page, event_feed

log = logging.getLogger(__name__)

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error body. ``x-should-retry: false`` stops the SDK retrying a 4xx (409, 429)
    that will not change by itself: its default retries those with backoff."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    merged = dict(headers or {})
    if status < 500:
        merged["x-should-retry"] = "false"
    return JSONResponse(body, status_code=status, headers=merged)


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors come out in OpenAI's shape (scoped to the routes using it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LorafleetError as exc:
                return _as_openai(exc)
            except RequestValidationError as exc:
                param, message, _ = validation_problem(exc)
                return openai_error(400, message, "invalid_request", param)
            except StarletteHTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), None, None)
            except Exception as exc:
                domain = database_down(exc)
                if domain is not None:
                    return _as_openai(domain)
                # As the app-wide handler does: the traceback to the log, nothing in the body.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error(500, "internal server error", "internal_error")

        return route


def _as_openai(exc: LorafleetError) -> Response:
    # Invalid input is OpenAI's 400 invalid_request_error (the SDK's BadRequestError).
    status = status_of(exc, invalid_input=400)
    return openai_error(status, exc.message, exc.code, exc.param, error_headers(exc, status))


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=64)]


# ---------------------------------------------------------------------------------------- files
@router.post("/files", response_model=FileOut, openapi_extra={"requestBody": MULTIPART_BODY})
async def create_file(
    request: Request,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FileOut:
    """Upload a JSONL dataset (multipart ``file`` + ``purpose``); validated line by line.

    Same upload path as the native ``POST /files``; OpenAI answers 200, not 201.
    """
    row, _ = await upload_dataset(request, owner.owner, session, storage, idempotency_key)
    return FileOut.model_validate(row)


@router.get("/files", response_model=Page[FileOut])
def list_files(
    owner: CurrentOwner,
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: After = None,
) -> Page[FileOut]:
    """The caller's files, newest first (``after`` = last file id of the previous page)."""
    rows, has_more = file_service.list_files(session, owner.owner, purpose, limit, after)
    return Page[FileOut](data=[FileOut.model_validate(r) for r in rows], has_more=has_more)


@router.get("/files/{file_id}", response_model=FileOut)
def retrieve_file(file_id: str, owner: CurrentOwner, session: SessionDep) -> FileOut:
    """One of the caller's files."""
    return FileOut.model_validate(file_service.get_file(session, owner.owner, file_id))


@router.delete("/files/{file_id}", response_model=Deleted)
def delete_file(
    file_id: str, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> Deleted:
    """Delete a file (the SDK's ``files.delete``); 409 while a queued or running job uses it."""
    row = file_service.delete_file(session, storage, owner.owner, file_id)
    return Deleted(id=row.id, object="file")


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def file_content(
    file_id: str, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The file's bytes as uploaded."""
    row = file_service.get_file(session, owner.owner, file_id)
    try:
        chunks = storage.open_stream(row.storage_key)
    except FileNotFoundError:
        raise NotFound(f"the bytes of file {file_id} are missing from storage") from None
    return StreamingResponse(chunks, media_type="application/jsonl")


# ----------------------------------------------------------------------------------------- jobs
@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(
    body: FineTuningJobCreate,
    owner: CurrentOwner,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FineTuningJob:
    """Create a fine-tuning job. The SDK sends an ``Idempotency-Key`` on every POST, so its own
    retries after a lost response return the first job instead of queueing a second."""
    spec = spec_from_openai(body)
    job, _ = job_service.create_job(session, owner.owner, spec, idempotency_key)
    return job_to_openai(job)


@router.get("/fine_tuning/jobs", response_model=Page[FineTuningJob])
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    after: After = None,
    limit: Limit = 20,
) -> Page[FineTuningJob]:
    """The caller's jobs, newest first."""
    rows, has_more = job_service.list_jobs(session, owner.owner, None, limit, after)
    return Page[FineTuningJob](data=[job_to_openai(j) for j in rows], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> FineTuningJob:
    """One job."""
    return job_to_openai(job_service.get_job(session, owner.owner, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> FineTuningJob:
    """Cancel a queued or running job (a running one reads `running` until its worker stops)."""
    return job_to_openai(job_service.cancel_job(session, owner.owner, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=Page[JobEventOut])
def list_events(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    after: After = None,
    limit: Limit = 20,
) -> Page[JobEventOut]:
    """History lines and per-step metrics, newest first."""
    job, items, has_more = event_feed(session, owner.owner, job_id, after, limit)
    total = (job.progress or {}).get("total_steps")
    data = [
        event_to_openai(item.row)  # type: ignore[arg-type]
        if item.kind == "message"
        else metric_to_openai(item.row, total)  # type: ignore[arg-type]
        for item in items
    ]
    return Page[JobEventOut](data=data, has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page[CheckpointOut])
def list_checkpoints(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    after: After = None,
    limit: Limit = 10,
) -> Page[CheckpointOut]:
    """Saved checkpoints, newest first; each is downloadable at the native
    ``/jobs/{id}/checkpoints/{step}/adapter``."""
    job, rows, has_more = checkpoint_page(session, owner.owner, job_id, after, limit)
    return Page[CheckpointOut](data=[checkpoint_to_openai(r, job) for r in rows], has_more=has_more)


# ---------------------------------------------------------------------------------------- models
@router.delete("/models/{model:path}", response_model=Deleted)
def delete_model(
    model: str, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> Deleted:
    """Delete a fine-tuned model (the SDK's ``models.delete``): its job's adapter, checkpoints
    and logs leave storage, the job stays as a tombstone (native ``DELETE /jobs/{id}``).

    Base models cannot be deleted through the API (they are the operator's folders).
    """
    ref = parse_model_name(model)
    if ref is None or ref.step is not None:
        raise NotFound(
            f"no fine-tuned model {model!r}: give a job's fine_tuned_model "
            "(ft:<base>:<owner>:<suffix>:<job id>)",
            param="model",
            code="model_not_found",
        )
    job_service.delete_job(session, storage, owner.owner, ref.job_id)
    return Deleted(id=model, object="model")


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
def unknown(path: str) -> Any:
    """Unknown ``/v1`` routes answer in OpenAI's error shape too (last route of the router)."""
    raise NotFound(
        f"no route /v1/{path} (lorafleet serves files, fine_tuning, models, chat/completions "
        "and completions)",
        code="unknown_url",
    )
