"""``/jobs``: submit, read, list, follow (JSON or SSE), cancel, clone, delete, download."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentOwner, SessionDep, StorageDep
from api.errors import database_down
from api.openapi import error_doc
from shared.db import session_factory
from shared.errors import NotFound
from shared.models import Job
from shared.schemas import (
    CheckpointList,
    CheckpointObject,
    Event,
    EventList,
    JobList,
    JobObject,
    MetricList,
    MetricPoint,
    Progress,
)
from shared.services import gangs
from shared.services import jobs as job_service
from shared.services import logs as log_service
from shared.services.downloads import ready_adapter
from shared.spec import CLONE_EXAMPLE, JobSpec
from shared.states import ALL_STATES, FINAL, QUEUED

router = APIRouter(tags=["jobs"])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
SSE_BATCH = 500

StatusFilter = Annotated[
    str | None, Query(pattern="^(" + "|".join(s.value for s in ALL_STATES) + ")$")
]
IdempotencyKey = Annotated[str | None, Header(max_length=255)]

REFUSED = error_doc(
    422,
    "invalid_input",
    "training.max_seq_length 100000 exceeds the 2048 positions of model 'tiny-llama' "
    "(max_position_embeddings); set training.max_seq_length to 2048 or less",
    "The job cannot run as asked: the message names the field and the setting to change "
    "(sequence length beyond the model, memory beyond every worker, unknown model or file).",
    "training.max_seq_length",
)
IDEMPOTENCY_REUSED = error_doc(
    409,
    "idempotency_key_reused",
    "Idempotency-Key was already used with a different job body",
    "The Idempotency-Key was used for a different body.",
    "Idempotency-Key",
)


def _with_queue_positions(session: SessionDep, jobs: list[Job]) -> list[JobObject]:
    queued = [job.id for job in jobs if job.status == QUEUED.value]
    places = job_service.queue_positions(session, queued)
    members = gangs.workers_of(session, jobs)
    return [
        JobObject.model_validate(job).model_copy(
            update={"queue_position": places.get(job.id), "workers": members.get(job.id, [])}
        )
        for job in jobs
    ]


def _job_object(session: SessionDep, job: Job) -> JobObject:
    return _with_queue_positions(session, [job])[0]


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobObject,
    responses={
        200: {"description": "An `Idempotency-Key` retry: the job created the first time."},
        **IDEMPOTENCY_REUSED,
        **REFUSED,
    },
)
def create_job(
    spec: JobSpec,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobObject:
    """Queue a fine-tuning job; an ``Idempotency-Key`` retry returns the first job (200).

    What cannot run is refused here rather than failing on a worker later: target modules the
    model lacks, a sequence length beyond its positions, memory beyond the largest worker (GPU
    memory, or RAM for CPU workers), a hub id the hub does not know (checked when the hub is
    reachable from the API).
    """
    job, created = job_service.create_job(session, owner.owner, spec, idempotency_key)
    if not created:
        response.status_code = 200
    return _job_object(session, job)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    """The caller's jobs, newest first; pass the last id of a page as ``after``.

    Deleted jobs (tombstones) are left out.
    """
    rows, has_more = job_service.list_jobs(session, owner.owner, status, limit, after)
    return JobList(data=_with_queue_positions(session, rows), has_more=has_more)


@router.get("/jobs/{job_id}", response_model=JobObject)
def get_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> JobObject:
    """One job, with its place in the queue while it waits."""
    return _job_object(session, job_service.get_job(session, owner.owner, job_id))


@router.get("/jobs/{job_id}/progress", response_model=Progress)
def get_progress(job_id: str, owner: CurrentOwner, session: SessionDep) -> Progress:
    """The latest progress snapshot (fields null until the worker reports)."""
    job = job_service.get_job(session, owner.owner, job_id)
    return Progress.of(job.status, job.progress)


@router.post(
    "/jobs/{job_id}/clone",
    status_code=201,
    response_model=JobObject,
    responses={**IDEMPOTENCY_REUSED, **REFUSED},
)
def clone_job(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    overrides: Annotated[
        dict[str, Any],
        Body(
            description="Fields of the job body to change; nested objects merge key by key "
            '(`{"training": {"learning_rate": 0.0001}}` keeps the other training settings).',
            examples=[CLONE_EXAMPLE],
        ),
    ] = {},  # noqa: B006 - FastAPI copies defaults per request
    idempotency_key: IdempotencyKey = None,
) -> JobObject:
    """A new job with this job's body, changed by ``overrides``; checked like a new submission."""
    job, _ = job_service.clone_job(session, owner.owner, job_id, overrides, idempotency_key)
    return _job_object(session, job)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobObject,
    responses=error_doc(
        409,
        "job_active",
        "job ftjob-0123456789abcdef01234567 is running; cancel it first "
        "(POST /jobs/ftjob-0123456789abcdef01234567/cancel), then delete it",
        "The job is queued or running.",
    ),
)
def delete_job(
    job_id: str, owner: CurrentOwner, session: SessionDep, storage: StorageDep
) -> JobObject:
    """Delete a final job's adapter, checkpoints and logs from storage.

    The job row stays as a tombstone (``deleted_at`` set, no adapter): ``GET /jobs/{id}`` still
    answers, ``GET /jobs`` no longer lists it. Deleting again is harmless.
    """
    return _job_object(session, job_service.delete_job(session, storage, owner.owner, job_id))


def _poll(job_id: str, after_id: int) -> tuple[list[Event], str | None, Progress | None]:
    # Status first, then events: a final status seen here guarantees its closing event (written
    # in the same commit) is in the events read just after.
    with session_factory()() as session:
        row = session.execute(select(Job.status, Job.progress).where(Job.id == job_id)).first()
        rows = job_service.events_after(session, job_id, after_id, SSE_BATCH)
        events = [Event.model_validate(r) for r in rows]
        if row is None:
            return events, None, None
        progress = Progress.of(row.status, row.progress) if row.progress else None
        return events, row.status, progress


async def _sse(request: Request, job_id: str, after_id: int) -> AsyncIterator[str]:
    """Events as ``id: N`` + ``data: {event}``; progress as ``event: progress`` frames.

    A progress frame goes out whenever the worker's snapshot changed (at most every poll), with
    no ``id:``, so ``Last-Event-ID`` stays the cursor of the event history.
    """
    last_sent = time.monotonic()
    last_progress: str | None = None
    while True:
        try:
            events, status, progress = await run_in_threadpool(_poll, job_id, after_id)
        except Exception as exc:
            if database_down(exc) is None:
                raise
            # The database restarts or fails over: the watcher sees a pause (keep-alives), not a
            # broken stream, and the events written meanwhile arrive once it is back.
        else:
            for event in events:
                after_id = event.id
                yield f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"
                last_sent = time.monotonic()
            if progress is not None:
                frame = progress.model_dump_json()
                if frame != last_progress:
                    last_progress = frame
                    yield f"event: progress\ndata: {frame}\n\n"
                    last_sent = time.monotonic()
            if status is None or (status in FINAL and len(events) < SSE_BATCH):
                return
            if len(events) == SSE_BATCH:
                continue
        if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(SSE_POLL_S)


@router.get(
    "/jobs/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def list_events(
    job_id: str,
    request: Request,
    owner: CurrentOwner,
    session: SessionDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventList | StreamingResponse:
    """Events oldest first; ``Accept: text/event-stream`` streams them live until the job ends.

    The stream sends each event as ``id: N`` + ``data: {json}`` and resumes after the
    ``Last-Event-ID`` header (or ``after``) when a client reconnects. Progress (step, losses,
    tokens/s, ETA) arrives in the same stream as ``event: progress`` frames whose data is the
    ``GET /jobs/{id}/progress`` object; ``EventSource`` users listen with
    ``addEventListener("progress", ...)``.
    """
    if accept and "text/event-stream" in accept:
        job_service.get_job(session, owner.owner, job_id)  # 404 before the stream starts
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
        session.close()  # the stream may last hours: hold no pooled connection meanwhile
        return StreamingResponse(
            _sse(request, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows = job_service.list_events(session, owner.owner, job_id, after, limit + 1)
    events = [Event.model_validate(r) for r in rows[:limit]]
    return EventList(data=events, has_more=len(rows) > limit)


@router.get("/jobs/{job_id}/metrics", response_model=MetricList)
def list_metrics(job_id: str, owner: CurrentOwner, session: SessionDep) -> MetricList:
    """The per-step training curve."""
    rows = job_service.list_metrics(session, owner.owner, job_id)
    return MetricList(data=[MetricPoint.model_validate(r) for r in rows])


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, owner: CurrentOwner, session: SessionDep) -> CheckpointList:
    """Checkpoints saved so far (a retried job resumes from the last)."""
    rows = job_service.list_checkpoints(session, owner.owner, job_id)
    return CheckpointList(data=[CheckpointObject.model_validate(r) for r in rows])


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobObject,
    responses=error_doc(
        409,
        "job_final",
        "job ftjob-0123456789abcdef01234567 already succeeded",
        "The job already succeeded or failed.",
    ),
)
def cancel_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> JobObject:
    """Cancel: queued jobs end at once, running ones stop at their next check (seconds)."""
    return _job_object(session, job_service.cancel_job(session, owner.owner, job_id))


@router.get(
    "/jobs/{job_id}/adapter",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The adapter .tar.gz"},
        **error_doc(
            409,
            "adapter_not_ready",
            "job ftjob-0123456789abcdef01234567 is running; its adapter exists once it has "
            "succeeded",
            "The job has not succeeded (yet), or its adapter was deleted.",
        ),
    },
)
def download_adapter(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The peft adapter folder as one .tar.gz, streamed from storage."""
    job = ready_adapter(session, owner.owner, job_id)
    assert job.adapter_key is not None
    etag = f'"{job.adapter_sha256}"'
    if if_none_match and if_none_match.strip() == etag:
        return Response(status_code=304, headers={"ETag": etag})
    try:
        chunks = storage.open_stream(job.adapter_key)
    except FileNotFoundError:
        raise NotFound(f"the adapter of job {job_id} is missing from storage") from None
    headers = {
        "ETag": etag,
        "X-Checksum-Sha256": job.adapter_sha256 or "",
        "Content-Disposition": f'attachment; filename="{job_id}-adapter.tar.gz"',
    }
    if job.adapter_bytes is not None:
        headers["Content-Length"] = str(job.adapter_bytes)
    return StreamingResponse(chunks, media_type="application/gzip", headers=headers)


@router.get(
    "/jobs/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "The attempt's rank logs."},
        404: {"description": "No such job, or no logs kept for that attempt yet."},
    },
)
def job_logs(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    attempt: Annotated[
        int | None, Query(ge=1, description="Attempt number (claim order); default the last.")
    ] = None,
) -> PlainTextResponse:
    """Each rank's log of one attempt (the end of it, as kept when the attempt ended)."""
    chosen, text = log_service.attempt_logs(session, storage, owner.owner, job_id, attempt)
    return PlainTextResponse(text, headers={"X-Attempt": str(chosen)})
