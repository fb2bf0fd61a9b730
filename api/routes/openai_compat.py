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
from api.errors import STATUS
from api.routes import files as native_files
from shared.errors import InvalidInput, LorafleetError, NotFound
from shared.openai_shapes import (
    CheckpointOut,
    FileOut,
    FineTuningJob,
    FineTuningJobCreate,
    JobEventOut,
    Page,
    checkpoint_to_openai,
    event_to_openai,
    file_to_openai,
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


def _status(exc: LorafleetError) -> int:
    if isinstance(exc, InvalidInput):
        return 400  # OpenAI's invalid_request_error; the SDK raises BadRequestError
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors come out in OpenAI's shape (scoped to the routes using it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LorafleetError as exc:
                status = _status(exc)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return openai_error(status, exc.message, exc.code, exc.param, headers)
            except RequestValidationError as exc:
                errors = exc.errors()
                first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
                loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
                param = ".".join(loc) or None
                message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
                return openai_error(400, message, "invalid_request", param)
            except StarletteHTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), None, None)
            except Exception:
                # As the app-wide handler does: the traceback to the log, nothing in the body.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error(500, "internal server error", "internal_error")

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=64)]


# ---------------------------------------------------------------------------------------- files
@router.post("/files", response_model=FileOut)
async def create_file(
    request: Request,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FileOut:
    """Upload a JSONL dataset (multipart ``file`` + ``purpose``); validated line by line.

    The native upload route does the streaming and validation; OpenAI answers 200, not 201.
    """
    native = await native_files.upload_file(
        request, response, owner, session, storage, idempotency_key
    )
    response.status_code = 200
    return file_to_openai(file_service.get_file(session, owner.owner, native.id))


@router.get("/files", response_model=Page[FileOut])
def list_files(
    owner: CurrentOwner,
    session: SessionDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: After = None,
) -> Page[FileOut]:
    """The caller's files, newest first (``after`` = last file id of the previous page)."""
    rows = file_service.list_files(session, owner.owner, purpose, limit=10000)
    if after:
        ids = [r.id for r in rows]
        if after not in ids:
            raise InvalidInput(f"after {after!r} names no file of yours", param="after")
        rows = rows[ids.index(after) + 1 :]
    return Page[FileOut](data=[file_to_openai(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/files/{file_id}", response_model=FileOut)
def retrieve_file(file_id: str, owner: CurrentOwner, session: SessionDep) -> FileOut:
    """One of the caller's files."""
    return file_to_openai(file_service.get_file(session, owner.owner, file_id))


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


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
def unknown(path: str) -> Any:
    """Unknown ``/v1`` routes answer in OpenAI's error shape too (last route of the router)."""
    raise NotFound(
        f"no route /v1/{path} (lorafleet serves files and fine_tuning)", code="unknown_url"
    )
