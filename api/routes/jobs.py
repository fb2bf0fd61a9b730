"""``/jobs``: submit, read, list, follow (JSON or SSE), cancel, download the adapter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentOwner, SessionDep, StorageDep
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
from shared.services import jobs as job_service
from shared.services import logs as log_service
from shared.services.downloads import ready_adapter
from shared.spec import JobSpec
from shared.states import ALL_STATES, FINAL

router = APIRouter(tags=["jobs"])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
SSE_BATCH = 500

StatusFilter = Annotated[
    str | None, Query(pattern="^(" + "|".join(s.value for s in ALL_STATES) + ")$")
]


@router.post("/jobs", status_code=201, response_model=JobObject)
def create_job(
    spec: JobSpec,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobObject:
    """Queue a fine-tuning job; an ``Idempotency-Key`` retry returns the first job (200)."""
    job, created = job_service.create_job(session, owner.owner, spec, idempotency_key)
    if not created:
        response.status_code = 200
    return JobObject.from_row(job)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    """The caller's jobs, newest first; pass the last id of a page as ``after``."""
    rows, has_more = job_service.list_jobs(session, owner.owner, status, limit, after)
    return JobList(data=[JobObject.from_row(j) for j in rows], has_more=has_more)


@router.get("/jobs/{job_id}", response_model=JobObject)
def get_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> JobObject:
    """One job."""
    return JobObject.from_row(job_service.get_job(session, owner.owner, job_id))


@router.get("/jobs/{job_id}/progress", response_model=Progress)
def get_progress(job_id: str, owner: CurrentOwner, session: SessionDep) -> Progress:
    """The latest progress snapshot (fields null until the worker reports)."""
    return Progress.from_job(job_service.get_job(session, owner.owner, job_id))


def _poll(job_id: str, after_id: int) -> tuple[list[Event], str | None]:
    # Status first, then events: a final status seen here guarantees its closing event (written
    # in the same commit) is in the events read just after.
    with session_factory()() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = job_service.events_after(session, job_id, after_id, SSE_BATCH)
        return [Event.from_row(r) for r in rows], status


async def _sse(request: Request, job_id: str, after_id: int) -> AsyncIterator[str]:
    last_sent = time.monotonic()
    while True:
        events, status = await run_in_threadpool(_poll, job_id, after_id)
        for event in events:
            after_id = event.id
            yield f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"
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
    ``Last-Event-ID`` header (or ``after``) when a client reconnects.
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
    return EventList(data=[Event.from_row(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/jobs/{job_id}/metrics", response_model=MetricList)
def list_metrics(job_id: str, owner: CurrentOwner, session: SessionDep) -> MetricList:
    """The per-step training curve."""
    rows = job_service.list_metrics(session, owner.owner, job_id)
    return MetricList(data=[MetricPoint.from_row(r) for r in rows])


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, owner: CurrentOwner, session: SessionDep) -> CheckpointList:
    """Checkpoints saved so far (a retried job resumes from the last)."""
    rows = job_service.list_checkpoints(session, owner.owner, job_id)
    return CheckpointList(data=[CheckpointObject.from_row(r) for r in rows])


@router.post("/jobs/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> JobObject:
    """Cancel: queued jobs end at once, running ones stop at their next check (seconds)."""
    return JobObject.from_row(job_service.cancel_job(session, owner.owner, job_id))


@router.get(
    "/jobs/{job_id}/adapter",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The adapter .tar.gz"},
        409: {"description": "The job has not succeeded (yet)."},
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
