"""Gangs: one attempt of a multi-node job (``resources.nodes`` N > 1), trained by N workers at once.

The database decides membership; the broker only wakes workers (one token per node). A gang is
the set of ``gang_members`` rows of one (job, epoch): ``epoch`` is the ``jobs.lease_epoch`` the
attempt runs as, so the rendezvous id ``<job id>-<epoch>`` and every fenced write of the attempt
(``runs.Lease``) name the same thing.

Life of a gang:

1. **Forming.** The job stays ``queued``. Workers take seats one by one (:func:`join`): each
   join locks the job row with a conditional UPDATE (still queued, not cancelled), forgets seats
   whose lease ran out (a worker that died while waiting), and takes the lowest free slot. The
   slot is the node rank; slot 0's worker will host the rendezvous (torch's TCPStore) at the
   ``host:port`` its seat records. A waiting member renews its seat (:func:`poll`) and may give
   it back (:func:`leave`) under the same row lock, so a seat is never both given back and
   counted into a starting gang.
2. **Start.** The join that fills the N-th seat moves the job ``queued -> running`` in the same
   transaction (``transitions.transition``: attempts + 1, ``lease_epoch`` = the gang's epoch,
   ``worker_id`` = slot 0's worker, which reports progress and sets the outcome). Training
   starts only then: every member sees ``running`` at its epoch and launches its ranks.
3. **Running.** Each member renews its seat's lease (slot 0 also the job's). When one stops
   (its worker died or froze), ``runs.reap_expired`` requeues the whole job: the epoch moves on,
   every other member finds its lease gone and ends its ranks, and the next gang resumes from the
   last checkpoint.

No deadlock (two half-filled gangs holding every worker), by one order, the *gang order*:
priority (high first), then age (oldest first), then id. A worker about to start a gang joins
the first forming gang of that order it fits instead (:func:`join_first`); a waiting member
that sees an earlier forming gang it fits moves there (:func:`earlier_forming`); so all waiting
members converge on one gang, the earliest. A gang that still does not fill (workers busy with
long jobs) is given up after ``LORAFLEET_GANG_WAIT_SECONDS``, and the worker then takes other
work once before trying again: gangs never block 1-node jobs behind them. A gang is not started
at all while fewer live workers could take it than it has nodes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from shared.models import GangMember, Job, Worker, utcnow
from shared.routing import Capacity, fits, node_ranks
from shared.services.transitions import rowcount, transition
from shared.spec import Resources
from shared.states import QUEUED, RUNNING, WorkerStatus

FORMING = "forming"
STALE_LEASES = 3  # as shared.services.fleet: a worker silent this many leases is not live


@dataclass(frozen=True)
class NodeOffer:
    """What a worker brings to a gang: where the others reach it, the port it would host the
    rendezvous on (if it gets slot 0), and what it trains with."""

    host: str
    port: int
    gpus: int = 0
    cpu_procs: int = 1


@dataclass(frozen=True)
class Seat:
    """A worker's seat in a forming (or started) gang."""

    job_id: str
    worker_id: str
    epoch: int
    slot: int
    nodes: int


@dataclass(frozen=True)
class GangPlan:
    """A started gang as one member sees it: everything its launch needs."""

    job_id: str
    epoch: int
    attempt: int
    slot: int
    workers: tuple[str, ...]  # by slot
    ranks: tuple[int, ...]  # by slot
    master_addr: str
    master_port: int

    @property
    def nodes(self) -> int:
        return len(self.workers)

    @property
    def world_size(self) -> int:
        return sum(self.ranks)

    @property
    def rank_offset(self) -> int:
        """Global rank of this member's first rank."""
        return sum(self.ranks[: self.slot])

    @property
    def local_ranks(self) -> int:
        return self.ranks[self.slot]

    @property
    def run_id(self) -> str:
        """The rendezvous id: job and attempt epoch."""
        return f"{self.job_id}-{self.epoch}"

    @property
    def worker_id(self) -> str:
        return self.workers[self.slot]


def gang_order() -> tuple[Any, ...]:
    """The one order gangs are formed in (see the module doc)."""
    return (Job.priority.desc(), Job.created_at.asc(), Job.id.asc())


def _lock(session: Session, job_id: str, *where: ColumnElement[bool]) -> bool:
    """Take the job row's lock (PostgreSQL row lock, SQLite write lock) if ``where`` holds.

    A no-op UPDATE: it changes nothing, but concurrent joins and leaves of one job queue up
    behind it until the caller commits, and see each other's seats afterwards.
    """
    if rowcount(
        session,
        update(Job).where(Job.id == job_id, *where).values(lease_epoch=Job.lease_epoch),
    ):
        return True
    session.rollback()
    return False


def _live_fitting(
    session: Session, gpus_required: int, gpu_type: str | None, lease_s: float
) -> int:
    """Live workers (heartbeat within STALE_LEASES leases, not offline) that fit the job."""
    cutoff = utcnow() - timedelta(seconds=STALE_LEASES * lease_s)
    rows = session.execute(
        select(Worker.gpus, Worker.gpu_type).where(
            Worker.status != WorkerStatus.OFFLINE.value, Worker.last_heartbeat >= cutoff
        )
    ).all()
    return sum(1 for gpus, kind in rows if fits(gpus_required, gpu_type, Capacity(gpus, kind)))


def join(
    session: Session,
    job_id: str,
    worker_id: str,
    offer: NodeOffer,
    lease_s: float,
) -> Seat | None:
    """Take a seat in the gang of queued job ``job_id``; the seat that fills it starts the job.

    None when the job is not (or no longer) a queued multi-node job, when its gang is full, or
    when starting a new gang is pointless because fewer live workers fit it than it has nodes.
    """
    now = utcnow()
    if not _lock(
        session, job_id, Job.status == QUEUED.value, Job.cancel_requested.is_(False), Job.nodes > 1
    ):
        return None
    job = session.execute(
        select(
            Job.lease_epoch,
            Job.nodes,
            Job.spec,
            Job.started_at,
            Job.gpus_required,
            Job.gpu_type,
        ).where(Job.id == job_id)
    ).one()
    epoch = job.lease_epoch + 1
    here = [GangMember.job_id == job_id, GangMember.epoch == epoch]
    # Seats of workers that stopped renewing (died while waiting), and an old seat of our own
    # (a restarted worker with the same name): gone before counting.
    session.execute(
        delete(GangMember).where(
            *here, (GangMember.lease_expires_at < now) | (GangMember.worker_id == worker_id)
        )
    )
    taken = {slot for (slot,) in session.execute(select(GangMember.slot).where(*here))}
    if len(taken) >= job.nodes or (
        not taken and _live_fitting(session, job.gpus_required, job.gpu_type, lease_s) < job.nodes
    ):
        session.rollback()
        return None
    slot = min(set(range(job.nodes)) - taken)
    resources = Resources.model_validate((job.spec or {}).get("resources") or {})
    until = now + timedelta(seconds=lease_s)
    session.add(
        GangMember(
            job_id=job_id,
            epoch=epoch,
            slot=slot,
            worker_id=worker_id,
            host=offer.host,
            port=offer.port,
            ranks=node_ranks(resources, offer.gpus, offer.cpu_procs),
            joined_at=now,
            lease_expires_at=until,
        )
    )
    session.flush()
    seat = Seat(job_id, worker_id, epoch, slot, job.nodes)
    if len(taken) + 1 < job.nodes:
        session.commit()
        return seat
    # The gang is full: start the job now, in this transaction, with fresh seat leases.
    members = list(session.scalars(select(GangMember).where(*here).order_by(GangMember.slot)))
    session.execute(update(GangMember).where(*here).values(lease_expires_at=until))
    host = members[0]
    listing = ", ".join(f"node {m.slot} {m.worker_id} ({m.ranks} rank(s))" for m in members)
    started = transition(
        session,
        job_id,
        QUEUED,
        RUNNING,
        where=[Job.lease_epoch == epoch - 1, Job.cancel_requested.is_(False)],
        event=(
            "info",
            f"gang of {job.nodes} workers formed: {listing}; world size "
            f"{sum(m.ranks for m in members)}, rendezvous {host.host}:{host.port} "
            f"(id {job_id}-{epoch})",
        ),
        event_data={"workers": [m.worker_id for m in members], "epoch": epoch},
        attempts=Job.attempts + 1,
        lease_epoch=epoch,
        started_at=job.started_at or now,
        worker_id=host.worker_id,
        lease_expires_at=until,
        updated_at=now,
    )
    return seat if started else None


def forming_gangs(session: Session, capacity: Capacity, exclude: Collection[str] = ()) -> list[str]:
    """Queued multi-node jobs with at least one live seat, in gang order, that fit ``capacity``."""
    now = utcnow()
    seated = (
        select(GangMember.id)
        .where(
            GangMember.job_id == Job.id,
            GangMember.epoch == Job.lease_epoch + 1,
            GangMember.lease_expires_at >= now,
        )
        .exists()
    )
    rows = session.execute(
        select(Job.id, Job.gpus_required, Job.gpu_type)
        .where(Job.status == QUEUED.value, Job.cancel_requested.is_(False), Job.nodes > 1, seated)
        .order_by(*gang_order())
    ).all()
    session.rollback()
    return [
        job_id
        for job_id, gpus, kind in rows
        if job_id not in exclude and fits(gpus, kind, capacity)
    ]


def join_first(
    session: Session,
    job_id: str,
    worker_id: str,
    offer: NodeOffer,
    capacity: Capacity,
    lease_s: float,
    exclude: Collection[str] = (),
) -> Seat | None:
    """Join the earliest forming gang this worker fits, else start the gang of ``job_id``."""
    for candidate in [*forming_gangs(session, capacity, exclude), job_id]:
        seat = join(session, candidate, worker_id, offer, lease_s)
        if seat is not None:
            return seat
    return None


def earlier_forming(
    session: Session, seat: Seat, capacity: Capacity, exclude: Collection[str] = ()
) -> list[str]:
    """Forming gangs before ``seat``'s in gang order that this worker fits (it should move)."""
    ahead = forming_gangs(session, capacity, exclude)
    if seat.job_id not in ahead:
        return ahead
    return ahead[: ahead.index(seat.job_id)]


def poll(session: Session, seat: Seat, lease_s: float) -> GangPlan | str | None:
    """Renew the seat; the started gang's plan, ``FORMING`` while it fills, None when the seat
    is gone (forgotten after its lease ran out, the job cancelled, or the attempt over)."""
    now = utcnow()
    renewed = rowcount(
        session,
        update(GangMember)
        .where(
            GangMember.job_id == seat.job_id,
            GangMember.epoch == seat.epoch,
            GangMember.worker_id == seat.worker_id,
            GangMember.left_at.is_(None),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s)),
    )
    job = session.execute(
        select(Job.status, Job.lease_epoch, Job.cancel_requested).where(Job.id == seat.job_id)
    ).one_or_none()
    session.commit()
    if not renewed or job is None:
        return None
    if job.status == RUNNING.value and job.lease_epoch == seat.epoch:
        return plan(session, seat)
    if job.status == QUEUED.value and job.lease_epoch == seat.epoch - 1:
        return None if job.cancel_requested else FORMING
    return None


def leave(session: Session, seat: Seat) -> bool:
    """Give the seat back while its gang has not started; False when it started (with this
    seat: the caller must run it, see :func:`poll`) or moved past it."""
    if not _lock(session, seat.job_id, Job.lease_epoch == seat.epoch - 1):
        return False
    session.execute(
        delete(GangMember).where(
            GangMember.job_id == seat.job_id,
            GangMember.epoch == seat.epoch,
            GangMember.worker_id == seat.worker_id,
        )
    )
    session.commit()
    return True


def plan(session: Session, seat: Seat) -> GangPlan:
    """The started gang of ``seat``: members by slot, rendezvous at slot 0's host and port."""
    members = list(
        session.scalars(
            select(GangMember)
            .where(GangMember.job_id == seat.job_id, GangMember.epoch == seat.epoch)
            .order_by(GangMember.slot)
            .execution_options(populate_existing=True)
        )
    )
    attempts = session.scalar(select(Job.attempts).where(Job.id == seat.job_id))
    session.rollback()
    return GangPlan(
        job_id=seat.job_id,
        epoch=seat.epoch,
        attempt=int(attempts or 0),
        slot=seat.slot,
        workers=tuple(m.worker_id for m in members),
        ranks=tuple(m.ranks for m in members),
        master_addr=members[0].host,
        master_port=members[0].port,
    )


def end_run(session: Session, job_id: str, epoch: int, worker_id: str) -> None:
    """A member's run ended (whatever the outcome): its seat no longer needs a lease."""
    now = utcnow()
    rowcount(
        session,
        update(GangMember)
        .where(
            GangMember.job_id == job_id,
            GangMember.epoch == epoch,
            GangMember.worker_id == worker_id,
            GangMember.left_at.is_(None),
        )
        .values(left_at=now),
    )
    session.commit()


def expired_member(now: datetime) -> ColumnElement[bool]:
    """SQL: the job's running gang has a member whose seat lease ran out (its worker is lost)."""
    return (
        select(GangMember.id)
        .where(
            GangMember.job_id == Job.id,
            GangMember.epoch == Job.lease_epoch,
            GangMember.left_at.is_(None),
            GangMember.lease_expires_at < now,
        )
        .exists()
    )


def lost_members(session: Session, job_id: str, epoch: int, now: datetime) -> list[str]:
    """Workers of the gang (job, epoch) whose seat lease ran out."""
    rows = session.scalars(
        select(GangMember.worker_id)
        .where(
            GangMember.job_id == job_id,
            GangMember.epoch == epoch,
            GangMember.left_at.is_(None),
            GangMember.lease_expires_at < now,
        )
        .order_by(GangMember.slot)
    )
    return list(rows)


def purge_forming(session: Session, now: datetime | None = None) -> int:
    """Forget seats of forming gangs whose worker stopped renewing them; returns how many."""
    now = now or utcnow()
    forming = (
        select(Job.id)
        .where(
            Job.id == GangMember.job_id,
            Job.lease_epoch == GangMember.epoch - 1,
        )
        .exists()
    )
    gone = rowcount(session, delete(GangMember).where(GangMember.lease_expires_at < now, forming))
    session.commit()
    return gone


def workers_of(session: Session, jobs: Iterable[Job]) -> dict[str, list[str]]:
    """Member worker ids of each job, by node rank: the running (or last) gang of a multi-node
    job, the seats taken while its next gang forms; a 1-node job's worker, if it has one."""
    found: dict[str, list[str]] = {}
    wanted: dict[tuple[str, int], str] = {}
    for job in jobs:
        if (job.nodes or 1) <= 1:
            found[job.id] = [job.worker_id] if job.worker_id else []
            continue
        epoch = job.lease_epoch + 1 if job.status == QUEUED.value else job.lease_epoch
        wanted[(job.id, epoch)] = job.id
        found[job.id] = []
    if wanted:
        rows = session.execute(
            select(GangMember.job_id, GangMember.epoch, GangMember.worker_id)
            .where(GangMember.job_id.in_({job_id for job_id, _ in wanted}))
            .order_by(GangMember.slot)
        ).all()
        for job_id, epoch, worker_id in rows:
            if (job_id, epoch) in wanted:
                found[job_id].append(worker_id)
    return found
