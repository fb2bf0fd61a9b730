"""Jobs as the API sees them: create (idempotent), read, list, cancel, delete, clone, queue place.

The job id is published to the broker only after the row is committed, so a worker never looks
up a job that is not there yet. If publishing fails the job stays queued in the database and the
reaper re-publishes it (``runs.stale_queued``): the broker is a hint, the row is the truth.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from shared.ids import new_job_id
from shared.models import Checkpoint, File, Job, JobEvent, JobMetric, utcnow
from shared.queueing import DEFAULT_QUEUE, publish_job
from shared.routing import requirements
from shared.services.files import check_method_fits_file
from shared.services.fleet import check_job_fits, model_info, with_default_targets, with_nodes
from shared.services.init_adapters import check_init_adapter
from shared.services.paging import newest_first_page
from shared.services.transitions import rowcount, transition
from shared.spec import JobSpec
from shared.states import ACTIVE, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from shared.storage import Storage
from shared.webhook_guard import check_webhook_url

log = logging.getLogger(__name__)


def request_hash(spec: JobSpec) -> str:
    """A stable digest of a job body, to tell an idempotent retry from a different request."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def queue_for(spec: JobSpec) -> str:
    """The Celery queue a job goes to: one queue for all.

    Routing is not done with queues: messages are wake-up tokens and the claiming worker picks a
    job that fits it from the database (``runs.claim_next``), so no per-GPU-type queue is needed.
    """
    return DEFAULT_QUEUE


def _check_file(session: Session, owner: str, file_id: str | None, param: str) -> File | None:
    if file_id is None:
        return None
    row = session.get(File, file_id)
    if row is None or row.owner != owner:
        raise InvalidInput(f"{param} {file_id!r} names no file of yours", param=param)
    return row


def _check_webhook(url: str | None, settings: Settings) -> None:
    problem = check_webhook_url(url, settings.webhook_allow)
    if problem is not None:
        raise InvalidInput(problem, param="webhook_url", code="webhook_not_allowed")


def _by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    query = select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    return session.scalar(query.execution_options(populate_existing=True))


def _replay(existing: Job, digest: str) -> tuple[Job, bool]:
    if existing.request_hash != digest:
        raise Conflict(
            "Idempotency-Key was already used with a different job body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing, False


def create_job(
    session: Session,
    owner: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
) -> tuple[Job, bool]:
    """Validate references, insert a queued job, commit, publish; returns (job, created).

    The same ``idempotency_key`` with the same body returns the first job (created False); with a
    different body it is a Conflict.
    """
    settings = settings or get_settings()
    digest = request_hash(spec)
    if idempotency_key:
        existing = _by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _replay(existing, digest)

    for param in ("training_file", "validation_file"):
        row = _check_file(session, owner, getattr(spec, param), param)
        check_method_fits_file(spec, row, param)
    # The one resolver (shared.modelinfo.resolve_base_model): folder names, mirrors
    # (models_dir/org/name), allowed hub ids and patterns such as "my-org/*"; paths refused.
    _check_webhook(spec.webhook_url, settings)
    info = model_info(spec, settings)
    spec = with_nodes(session, with_default_targets(spec, info), settings)
    check_init_adapter(session, owner, spec)
    # target_modules, routing and memory against the registered fleet: refuse now what could
    # never run, with the reason, instead of a job that waits forever or fails on a worker.
    check_job_fits(session, spec, settings, info)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= settings.max_active_jobs_per_owner:
        raise QuotaExceeded(
            f"you already have {active} queued or running jobs "
            f"(limit {settings.max_active_jobs_per_owner})"
        )

    now = utcnow()
    gpus_required, gpu_type = requirements(spec)
    job = Job(
        id=new_job_id(),
        owner=owner,
        status=QUEUED.value,
        spec=spec.model_dump(mode="json"),
        base_model=spec.base_model,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        queue=queue_for(spec),
        priority=spec.priority,
        created_at=now,
        updated_at=now,
        enqueued_at=now,
        attempts=0,
        max_attempts=spec.max_attempts or settings.max_attempts,
        cancel_requested=False,
        idempotency_key=idempotency_key or None,
        request_hash=digest,
        webhook_url=spec.webhook_url,
        gpus_required=gpus_required,
        gpu_type=gpu_type,
        nodes=spec.resources.nodes,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, level="info", message="job created", created_at=now))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = _by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest)

    try:
        publish_job(job.id, job.queue, job.priority, tokens=job.nodes)
    except Exception:  # the reaper re-publishes queued jobs without a live message
        log.exception("publishing job %s failed; it stays queued for the reaper", job.id)
    return job, True


def get_job(session: Session, owner: str, job_id: str) -> Job:
    """The owner's job; another owner's id is NotFound exactly like a missing one."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.owner != owner:
        raise NotFound(f"no job {job_id}", param="job_id")
    return job


def list_jobs(
    session: Session,
    owner: str,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
) -> tuple[list[Job], bool]:
    """The owner's jobs newest first; ``after`` is the last id of the previous page.

    Returns (jobs, has_more). Ordering is (created_at, id) descending so ties are stable.
    """
    query = select(Job).where(Job.owner == owner, Job.deleted_at.is_(None))
    if status:
        query = query.where(Job.status == status)
    return newest_first_page(session, Job, query, owner, after, limit, "job")


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Cancel: a queued job ends at once; a running one gets ``cancel_requested`` for its worker.

    Cancelling a cancelled job returns it unchanged (safe to retry); a succeeded or failed job
    is a Conflict.
    """
    for _ in range(3):  # the job may start running between our two conditional updates
        now = utcnow()
        done = transition(
            session,
            job_id,
            QUEUED,
            CANCELLED,
            where=[Job.owner == owner],
            event=("info", "cancelled while queued"),
            finished_at=now,
            updated_at=now,
            cancel_requested=True,
        )
        if done:
            # No worker will ever see this job: its webhook goes from here.
            from shared.services.webhooks import notify_final

            notify_final(job_id)
            return get_job(session, owner, job_id)
        # Not a status change: the flag asks the running attempt to stop; its worker (or the
        # reaper, if the worker is gone) makes the transition to cancelled.
        requested = rowcount(
            session,
            update(Job)
            .where(Job.id == job_id, Job.owner == owner, Job.status == RUNNING.value)
            .values(cancel_requested=True, updated_at=now),
        )
        if requested:
            session.add(JobEvent(job_id=job_id, level="info", message="cancel requested; stopping"))
            session.commit()
            return get_job(session, owner, job_id)
        session.rollback()
        job = get_job(session, owner, job_id)
        if job.status == CANCELLED.value:
            return job
        if job.status not in (QUEUED.value, RUNNING.value):
            raise Conflict(f"job {job_id} already {job.status}", code="job_final")
    raise Conflict(f"job {job_id} changed state while cancelling; retry")


def get_progress(session: Session, owner: str, job_id: str) -> dict[str, Any]:
    """The job's latest progress snapshot merged with its status."""
    job = get_job(session, owner, job_id)
    progress = dict(job.progress or {})
    progress["status"] = job.status
    return progress


def list_events(
    session: Session, owner: str, job_id: str, after_id: int = 0, limit: int = 1000
) -> list[JobEvent]:
    """Events oldest first with id greater than ``after_id`` (the SSE / polling cursor)."""
    get_job(session, owner, job_id)
    return events_after(session, job_id, after_id, limit)


def events_after(session: Session, job_id: str, after_id: int, limit: int = 1000) -> list[JobEvent]:
    """Events of a job past a cursor, without the ownership check (callers did it once)."""
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.scalars(query.execution_options(populate_existing=True)))


def list_metrics(session: Session, owner: str, job_id: str) -> list[JobMetric]:
    """The per-step series, by step."""
    get_job(session, owner, job_id)
    query = select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def list_checkpoints(session: Session, owner: str, job_id: str) -> list[Checkpoint]:
    """Recorded checkpoints, by step."""
    get_job(session, owner, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def count_by_status(session: Session) -> dict[str, int]:
    """Jobs per status over all owners (for /metrics)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(count) for status, count in rows}


def oldest_queued_at(session: Session) -> datetime | None:
    """When the longest-waiting queued job was created (queue latency for /metrics)."""
    return session.scalar(select(func.min(Job.created_at)).where(Job.status == QUEUED.value))


# ------------------------------------------------------------------------ managing final jobs
def delete_job(session: Session, storage: Storage, owner: str, job_id: str) -> Job:
    """Delete a final job's artifacts (adapter, checkpoints, logs) and keep its row as a tombstone.

    Why a tombstone rather than removing the row: ids are never reused, a webhook or an audit
    line that names the job still resolves (``GET /jobs/{id}`` answers with ``deleted_at``), and
    the small history (events, metrics) stays for the owner. What costs space, everything under
    ``jobs/<id>/`` in storage, is removed. Deleting again returns the tombstone; a queued or
    running job is a Conflict (cancel it first).
    """
    job = get_job(session, owner, job_id)
    if job.status not in (SUCCEEDED.value, FAILED.value, CANCELLED.value):
        raise Conflict(
            f"job {job_id} is {job.status}; cancel it first (POST /jobs/{job_id}/cancel), "
            "then delete it",
            code="job_active",
        )
    if job.deleted_at is None:
        now = utcnow()
        job.deleted_at = now
        job.updated_at = now
        job.adapter_key = None
        job.adapter_sha256 = None
        job.adapter_bytes = None
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
        session.add(JobEvent(job_id=job_id, level="info", message="job deleted", created_at=now))
        session.commit()
    # After the commit, and again on a repeated delete: a crash midway leaves objects that the
    # next delete removes, never a live row pointing at deleted objects.
    for key in storage.list(job_storage_prefix(job_id)):
        storage.delete(key)
    return job


def job_storage_prefix(job_id: str) -> str:
    """Where every object of a job lives in storage (adapter, checkpoints, logs)."""
    return f"jobs/{job_id}/"


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: nested objects merge key by key, anything else
    (lists, scalars, null) replaces. ``{"training": {"learning_rate": 1e-4}}`` changes one
    setting and keeps the others."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def clone_job(
    session: Session,
    owner: str,
    job_id: str,
    overrides: dict[str, Any],
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """A new job from an existing job's body with ``overrides`` merged in (``merge_overrides``).

    The result goes through ``create_job`` like any submission, so every check applies (the
    training file must still exist, the model must still fit). Works on any job of the owner,
    final or not, deleted or not.
    """
    source = get_job(session, owner, job_id)
    body = merge_overrides(dict(source.spec or {}), overrides)
    try:
        spec = JobSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"{param}: {first.get('msg')}", param=param) from None
    return create_job(session, owner, spec, idempotency_key)


def _ranked_queue() -> Any:
    """Queued jobs with their place in the dispatch order, as a subquery (``id``, ``position``).

    The order is the one ``runs.claim_next`` uses: priority (high first), then owners with
    fewer running jobs first, then age. It is fleet-wide: a job routed to GPUs that are busy
    may wait longer than its place says. One window function, whatever the queue's length.
    """
    running = (
        select(Job.owner.label("owner"), func.count().label("n"))
        .where(Job.status == RUNNING.value)
        .group_by(Job.owner)
        .subquery()
    )
    load = func.coalesce(running.c.n, 0)
    return (
        select(
            Job.id.label("id"),
            func.row_number()
            .over(order_by=(Job.priority.desc(), load.asc(), Job.created_at.asc(), Job.id))
            .label("position"),
        )
        .outerjoin(running, running.c.owner == Job.owner)
        .where(Job.status == QUEUED.value, Job.cancel_requested.is_(False))
        .subquery()
    )


def queue_positions(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """Place in the dispatch order of each of ``job_ids`` that is queued (1 = taken next)."""
    if not job_ids:
        return {}
    ranked = _ranked_queue()
    rows = session.execute(
        select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(list(job_ids)))
    )
    return {job: int(position) for job, position in rows}


def queue_overview(session: Session, limit: int = 100) -> list[tuple[int, Job]]:
    """The first ``limit`` queued jobs of every owner in dispatch order: (position, job)."""
    ranked = _ranked_queue()
    rows = session.execute(
        select(ranked.c.position, Job)
        .join(Job, Job.id == ranked.c.id)
        .order_by(ranked.c.position)
        .limit(limit)
    )
    return [(int(position), job) for position, job in rows]
