"""The worker's side of a job: claim, lease, progress, artifacts, outcome, and recovery.

Knows nothing of Celery or torch. Each state change is ONE conditional UPDATE whose WHERE clause
states what must still be true (queued and not cancelled; running and still ours), so a duplicate
delivery, a late worker or a reaper racing with a live worker can never both win: the loser sees
zero rows updated and drops out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, delete, func, literal, or_, select, update
from sqlalchemy.orm import Session

from shared.models import Checkpoint, GangMember, Job, JobEvent, JobMetric, utcnow
from shared.routing import Capacity, fits
from shared.services import gangs
from shared.services.transitions import rowcount, transition
from shared.spec import DPO_METRICS, EVAL_DPO_METRICS
from shared.states import CANCELLED, FAILED, FINAL, QUEUED, RUNNING, SUCCEEDED, JobStatus

METRIC_FIELDS = (
    "train_loss",
    "eval_loss",
    "learning_rate",
    "tokens_per_second",
    *DPO_METRICS,
    *EVAL_DPO_METRICS,
)


class LeaseLost(Exception):
    """A fenced write found the job no longer held by this attempt: stop, touch nothing."""


@dataclass(frozen=True)
class Lease:
    """One attempt's right to write: (job, worker, epoch). ``epoch`` is ``jobs.lease_epoch`` as
    the claim set it; it only grows, so a thawed or late worker can never pass for the live one.

    ``slot``: the node rank of a gang member (``shared.services.gangs``), None for a 1-node job.
    Slot 0 is the job's ``worker_id`` (it reports progress and sets the outcome); the others
    hold the attempt through their seat of the same epoch.
    """

    job_id: str
    worker_id: str
    epoch: int
    slot: int | None = None

    @classmethod
    def of(cls, job: Job) -> Lease:
        assert job.worker_id is not None, "a lease exists only for a claimed job"
        return cls(job.id, job.worker_id, job.lease_epoch)

    @property
    def leads(self) -> bool:
        """Whether this attempt's worker is the job's own (1-node job, or gang slot 0)."""
        return not self.slot

    def holds(self) -> list[ColumnElement[bool]]:
        """The WHERE clause of every write of this attempt."""
        held = [
            Job.id == self.job_id,
            Job.lease_epoch == self.epoch,
            Job.status == RUNNING.value,
        ]
        if self.leads:
            return [*held, Job.worker_id == self.worker_id]
        seated = select(GangMember.id).where(
            GangMember.job_id == self.job_id,
            GangMember.epoch == self.epoch,
            GangMember.worker_id == self.worker_id,
        )
        return [*held, seated.exists()]


def claim_job(session: Session, job_id: str, worker_id: str, lease_s: float) -> Job | None:
    """Take a queued job for ``worker_id``; None when it is not (or no longer) claimable."""
    now = utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    started_at = job.started_at if job is not None and job.started_at else now
    session.rollback()
    claimed = transition(
        session,
        job_id,
        QUEUED,
        RUNNING,
        where=[Job.cancel_requested.is_(False)],
        attempts=Job.attempts + 1,
        lease_epoch=Job.lease_epoch + 1,
        started_at=started_at,
        worker_id=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_s),
        updated_at=now,
    )
    if not claimed:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def claim_next(
    session: Session,
    worker_id: str,
    capacity: Capacity,
    lease_s: float,
    preferred_job_id: str | None = None,
    scan: int = 50,
    offer: gangs.NodeOffer | None = None,
    skip: Collection[str] = (),
) -> Job | gangs.Seat | None:
    """Claim the best queued job this worker can run; None when nothing fits.

    The broker message is only a wake-up token: whichever job it names, the database picks the
    job. Among queued, non-cancelled jobs that fit ``capacity`` (see :mod:`shared.routing`) the
    order is priority (high first), then fairness (owners with fewer running jobs first, so one
    owner's backlog cannot starve the others), then age (oldest first); ``preferred_job_id``, the
    job the message named, only breaks exact ties. Each candidate is taken with the same
    conditional UPDATE as :func:`claim_job`; losing a race to another worker moves on to the next.

    A multi-node job is not claimed but joined: the worker gets a :class:`gangs.Seat` in its gang
    (or in the earliest forming gang it fits, :func:`gangs.join_first`), and the job runs once
    every seat is taken. Only callers that bring an ``offer`` (where the rendezvous would be)
    join gangs. ``skip``: jobs to pass over (a gang this worker just gave up waiting for).
    """
    running = (
        select(Job.owner.label("owner"), func.count().label("n"))
        .where(Job.status == RUNNING.value)
        .group_by(Job.owner)
        .subquery()
    )
    load = func.coalesce(running.c.n, 0)
    query = (
        select(Job.id, Job.gpus_required, Job.gpu_type, Job.nodes)
        .outerjoin(running, running.c.owner == Job.owner)
        .where(
            Job.status == QUEUED.value,
            Job.cancel_requested.is_(False),
            Job.gpus_required <= capacity.gpus,
        )
    )
    if capacity.gpu_type:
        # LIKE is a superset of the substring rule ('%' and '_' in a job's gpu_type are
        # wildcards here); routing.fits below re-checks exactly.
        query = query.where(
            Job.gpu_type.is_(None)
            | func.lower(literal(capacity.gpu_type)).like("%" + func.lower(Job.gpu_type) + "%")
        )
    else:
        query = query.where(Job.gpu_type.is_(None))
    tie = case((Job.id == (preferred_job_id or ""), 0), else_=1)
    query = query.order_by(
        Job.priority.desc(), load.asc(), Job.created_at.asc(), tie, Job.id
    ).limit(scan)
    for _ in range(3):  # a full page lost to other workers: look again
        candidates = session.execute(query).all()
        session.rollback()
        if not candidates:
            return None
        for job_id, gpus_required, gpu_type, nodes in candidates:
            if job_id in skip or not fits(gpus_required, gpu_type, capacity):
                continue
            if nodes > 1:
                if offer is None:
                    continue
                seat = gangs.join_first(
                    session, job_id, worker_id, offer, capacity, lease_s, exclude=skip
                )
                if seat is not None:
                    return seat
                continue
            job = claim_job(session, job_id, worker_id, lease_s)
            if job is not None:
                return job
        if len(candidates) < scan:
            return None
    return None


def renew_lease(session: Session, lease: Lease, lease_s: float) -> bool:
    """Extend our lease; False means the job is no longer ours or running: stop training.

    A gang member renews its seat (the reaper requeues the gang when any seat runs out); slot 0
    also renews the job's lease, as a 1-node job's worker does.
    """
    now = utcnow()
    until = now + timedelta(seconds=lease_s)
    if lease.slot is not None:
        seat = rowcount(
            session,
            update(GangMember)
            .where(
                GangMember.job_id == lease.job_id,
                GangMember.epoch == lease.epoch,
                GangMember.worker_id == lease.worker_id,
                GangMember.left_at.is_(None),
                select(Job.id).where(*lease.holds()).exists(),
            )
            .values(lease_expires_at=until),
        )
        if not seat or not lease.leads:
            session.commit()
            return bool(seat)
    renewed = rowcount(session, update(Job).where(*lease.holds()).values(lease_expires_at=until))
    session.commit()
    return bool(renewed)


def cancel_requested(session: Session, job_id: str) -> bool:
    """Whether someone asked this job to stop (or it is gone / already cancelled)."""
    row = session.execute(
        select(Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).one_or_none()
    session.rollback()
    if row is None:
        return True
    return bool(row.cancel_requested) or row.status == CANCELLED.value


def _hold(session: Session, lease: Lease) -> None:
    """Start a fenced write: lock the job row while it is still held by ``lease``.

    The UPDATE takes the row lock (PostgreSQL) or the write lock (SQLite) until the caller
    commits, so the reaper cannot requeue the job between this check and the write it guards.
    Raises :class:`LeaseLost` (after a rollback) when the lease is gone.
    """
    if not rowcount(session, update(Job).where(*lease.holds()).values(updated_at=utcnow())):
        session.rollback()
        raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker_id}#{lease.epoch}")


def record_progress(session: Session, lease: Lease, progress: Mapping[str, Any]) -> None:
    """Store the latest progress snapshot with ``updated_at`` (fenced).

    The fields are the engine's (``worker.training.events.Step.snapshot``); the API shows those
    its ``Progress`` schema names, so a new metric is added where the record is defined.
    """
    now = utcnow()
    snapshot: dict[str, Any] = {**progress, "updated_at": now.isoformat()}
    if not rowcount(
        session, update(Job).where(*lease.holds()).values(progress=snapshot, updated_at=now)
    ):
        session.rollback()
        raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker_id}#{lease.epoch}")
    session.commit()


def record_strategy(session: Session, lease: Lease, strategy: str) -> None:
    """Record the strategy (``ddp``/``fsdp``) the attempt's run trains with (fenced)."""
    if not rowcount(session, update(Job).where(*lease.holds()).values(strategy=strategy)):
        session.rollback()
        raise LeaseLost(f"job {lease.job_id} is no longer held by {lease.worker_id}#{lease.epoch}")
    session.commit()


def add_event(
    session: Session,
    lease: Lease,
    level: str,
    message: str,
    data: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> None:
    """Append a line to the job's history (fenced: a stale attempt writes nothing)."""
    _hold(session, lease)
    session.add(
        JobEvent(
            job_id=lease.job_id,
            level=level,
            message=message,
            data=data,
            created_at=created_at or utcnow(),
        )
    )
    session.commit()


def add_metrics(session: Session, lease: Lease, rows: Iterable[Mapping[str, Any]]) -> None:
    """Upsert per-step metric points (fenced): a resumed attempt overwrites the steps it repeats."""
    points = [dict(r) for r in rows]
    if not points:
        return
    _hold(session, lease)
    steps = [int(p["step"]) for p in points]
    session.execute(
        delete(JobMetric).where(JobMetric.job_id == lease.job_id, JobMetric.step.in_(steps))
    )
    by_step = {int(p["step"]): p for p in points}  # the last value of a repeated step wins
    session.add_all(
        JobMetric(job_id=lease.job_id, step=step, **{k: p.get(k) for k in METRIC_FIELDS})
        for step, p in sorted(by_step.items())
    )
    session.commit()


def record_checkpoint(
    session: Session,
    lease: Lease,
    step: int,
    key: str,
    sha256: str,
    metrics: dict[str, Any] | None = None,
) -> Checkpoint:
    """Commit a checkpoint whose upload finished: the row is what makes it usable for resume.

    Fenced: only the lease holder commits, so a stale attempt's late upload is never recorded.
    A later attempt that checkpoints the same step again replaces the row (its objects carry
    its own epoch in the key, so nothing is overwritten in storage).
    """
    _hold(session, lease)
    session.execute(
        delete(Checkpoint).where(Checkpoint.job_id == lease.job_id, Checkpoint.step == step)
    )
    row = Checkpoint(
        job_id=lease.job_id,
        step=step,
        storage_key=key,
        sha256=sha256,
        metrics=metrics,
        epoch=lease.epoch,
        worker_id=lease.worker_id,
    )
    session.add(row)
    session.commit()
    return row


def committed_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """Checkpoints a new attempt may resume from, newest first (each verified on download)."""
    query = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.sha256.is_not(None))
        .order_by(Checkpoint.step.desc())
    )
    rows = list(session.scalars(query.execution_options(populate_existing=True)))
    session.rollback()
    return rows


def prune_checkpoints(session: Session, lease: Lease, keep: int) -> list[str]:
    """Forget all but the newest ``keep`` checkpoints (fenced); returns the storage keys to delete.

    Rows go first (committed), objects after: a crash in between leaves orphan objects, never a
    row that points at a deleted checkpoint.
    """
    _hold(session, lease)
    query = select(Checkpoint).where(Checkpoint.job_id == lease.job_id).order_by(Checkpoint.step)
    rows = list(session.scalars(query))
    old = rows[:-keep] if keep > 0 else rows
    if old:
        session.execute(delete(Checkpoint).where(Checkpoint.id.in_([r.id for r in old])))
    session.commit()
    return [r.storage_key for r in old]


def finish_job(
    session: Session,
    lease: Lease,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
    adapter_key: str | None = None,
    adapter_sha256: str | None = None,
    adapter_bytes: int | None = None,
    manifest: dict[str, Any] | None = None,
    trained_tokens: int | None = None,
) -> bool:
    """Set a final state if the job is still held by ``lease``; False otherwise.

    Also writes the closing event, so every finished job's history ends with its outcome.
    """
    final = JobStatus(status)
    if final not in FINAL:
        raise ValueError(f"finish_job needs a final status, not {status!r}")
    now = utcnow()
    values: dict[str, Any] = {
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "error_code": error_code,
        "error_message": error_message,
    }
    optional = {
        "adapter_key": adapter_key,
        "adapter_sha256": adapter_sha256,
        "adapter_bytes": adapter_bytes,
        "manifest": manifest,
        "trained_tokens": trained_tokens,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    if final == SUCCEEDED:
        event = ("info", "job succeeded")
        data: dict[str, Any] | None = {"trained_tokens": trained_tokens}
    elif final == CANCELLED:
        event, data = ("info", "job cancelled"), None
    else:
        message = f"job failed: {error_message or error_code or 'unknown error'}"
        event, data = ("error", message), {"code": error_code}
    return transition(
        session,
        lease.job_id,
        RUNNING,
        final,
        where=lease.holds(),
        event=event,
        event_data=data,
        **values,
    )


def retry_job(session: Session, lease: Lease, cause: str, message: str) -> str | None:
    """An infrastructure failure ended this attempt: requeue the job (attempts kept) or, out of
    attempts, fail it (cancel it, if a cancel was requested); returns the new status, or None
    when the lease was already gone."""
    row = session.get(Job, lease.job_id, populate_existing=True)
    session.rollback()
    if row is None:
        return None
    now = utcnow()
    if _cancel_if_requested(session, lease):
        return CANCELLED.value
    if row.attempts >= row.max_attempts:
        text = f"{message} (attempt {row.attempts} of {row.max_attempts}; no attempts left)"
        done = transition(
            session,
            lease.job_id,
            RUNNING,
            FAILED,
            where=lease.holds(),
            event=("error", f"job failed: {text}"),
            event_data={"code": cause},
            finished_at=now,
            lease_expires_at=None,
            error_code=cause,
            error_message=text,
        )
        return FAILED.value if done else None
    text = (
        f"{message}; retrying from the last checkpoint "
        f"(attempt {row.attempts} of {row.max_attempts})"
    )
    done = transition(
        session,
        lease.job_id,
        RUNNING,
        QUEUED,
        where=[*lease.holds(), Job.cancel_requested.is_(False)],
        event=("warning", text),
        event_data={"code": cause},
        worker_id=None,
        lease_expires_at=None,
        enqueued_at=now,
    )
    if done:
        return QUEUED.value
    return CANCELLED.value if _cancel_if_requested(session, lease) else None


def _cancel_if_requested(session: Session, lease: Lease, message: str = "job cancelled") -> bool:
    """End a job we hold as cancelled if a cancel was requested; True if it did.

    A job asked to stop is never requeued: it would sit queued with the flag set, which no
    worker claims. (In a gang, cancelling ends every member's ranks, and node 0 may see its
    peers vanish before it sees the cancel.) Callers requeue only where the flag is still
    clear, and come back here when that fails, so a cancel arriving in between is not lost.
    """
    return transition(
        session,
        lease.job_id,
        RUNNING,
        CANCELLED,
        where=[*lease.holds(), Job.cancel_requested.is_(True)],
        event=("info", message),
        finished_at=utcnow(),
        lease_expires_at=None,
    )


def reap_expired(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    """Recover running jobs whose lease expired (their worker died); returns (job_id, status).

    A cancel request ends them cancelled; out of attempts ends them failed; otherwise they go back
    to queued for another worker (the caller re-publishes them). Each move is conditional on the
    lease still being expired, so a worker that renews at the last moment keeps its job.
    """
    now = now or utcnow()
    # A gang is lost with any one of its members: the others are stopped by the new epoch.
    lost = or_(Job.lease_expires_at < now, gangs.expired_member(now))
    expired = list(
        session.scalars(
            select(Job)
            .where(Job.status == RUNNING.value, lost)
            .execution_options(populate_existing=True)
        )
    )
    session.rollback()
    outcomes: list[tuple[str, str]] = []
    for job in expired:
        values: dict[str, Any]
        who = "worker lost"
        if job.nodes > 1:
            gone = gangs.lost_members(session, job.id, job.lease_epoch, now)
            session.rollback()
            if job.lease_expires_at is not None and job.lease_expires_at < now:
                gone = [job.worker_id or "node 0", *[w for w in gone if w != job.worker_id]]
            who = f"gang member lost ({', '.join(gone) or 'unknown'}); whole gang stopped"
        if job.cancel_requested:
            new, values = CANCELLED, {"finished_at": now}
            level, message = "info", f"{who} while cancelling; job cancelled"
        elif job.attempts >= job.max_attempts:
            new = FAILED
            text = f"{who} on attempt {job.attempts} of {job.max_attempts}; giving up"
            values = {
                "finished_at": now,
                "error_code": "max_attempts_exceeded",
                "error_message": f"max attempts exceeded: {text}",
            }
            level, message = "error", f"max attempts exceeded: {text}"
        else:
            new, values = QUEUED, {"enqueued_at": now, "worker_id": None}
            level = "warning"
            message = f"{who}; requeued (attempt {job.attempts} of {job.max_attempts})"
        if transition(
            session,
            job.id,
            RUNNING,
            new,
            # Still expired: a worker that renews at the last moment keeps its job. The cancel
            # flag read above must still hold too (a cancel in between is not requeued).
            where=[lost, Job.cancel_requested.is_(bool(job.cancel_requested))],
            event=(level, message),
            updated_at=now,
            lease_expires_at=None,
            **values,
        ):
            outcomes.append((job.id, new.value))
    return outcomes


def stale_queued(
    session: Session, older_than: datetime | float, now: datetime | None = None
) -> list[Job]:
    """Queued jobs not (re)published since ``older_than``; touches their ``enqueued_at``.

    ``older_than`` is a cutoff datetime or an age in seconds. The touch is conditional on the old
    value, so of several reapers only one re-publishes a given job.
    """
    now = now or utcnow()
    if not isinstance(older_than, datetime):
        older_than = now - timedelta(seconds=older_than)
    cutoff = older_than
    candidates = list(
        session.scalars(
            select(Job)
            .where(Job.status == QUEUED.value, Job.enqueued_at < cutoff)
            .order_by(Job.priority.desc(), Job.created_at)
            .execution_options(populate_existing=True)
        )
    )
    session.rollback()
    touched: list[Job] = []
    for job in candidates:
        if rowcount(
            session,
            update(Job)
            .where(Job.id == job.id, Job.status == QUEUED.value, Job.enqueued_at == job.enqueued_at)
            .values(enqueued_at=now),
        ):
            session.commit()
            touched.append(job)
        else:
            session.rollback()
    for job in touched:
        session.refresh(job)
    return touched


def release_job(session: Session, lease: Lease, step: int | None) -> str | None:
    """Hand a running job back to the queue without spending an attempt (a draining worker
    checkpointed it on request); returns the new status (``cancelled`` when a cancel was
    requested meanwhile), None if it was no longer ours."""
    where = f"checkpointed at step {step}" if step is not None else "before its first step"
    now = utcnow()
    # A cancel that arrived while it drained wins: the job ends cancelled rather than going back
    # to the queue with a cancel request no worker would ever act on.
    drained = f"worker draining: {where}; cancel requested, job cancelled"
    if _cancel_if_requested(session, lease, drained):
        return CANCELLED.value
    done = transition(
        session,
        lease.job_id,
        RUNNING,
        QUEUED,
        where=[*lease.holds(), Job.cancel_requested.is_(False)],
        event=("warning", f"worker draining: {where}; requeued"),
        worker_id=None,
        lease_expires_at=None,
        enqueued_at=now,
        updated_at=now,
        attempts=Job.attempts - 1,
    )
    if done:
        return QUEUED.value
    return CANCELLED.value if _cancel_if_requested(session, lease, drained) else None
