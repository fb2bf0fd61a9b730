"""Celery glue: the task takes a job id, claims the row, runs it, records the outcome."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from shared.config import get_settings
from shared.db import session_scope
from shared.queueing import TRAIN_TASK
from shared.services import runs
from shared.services.gangs import GangPlan, NodeOffer, Seat
from shared.services.runs import Lease
from worker import fleet
from worker.celery_app import app
from worker.gang import GangWait
from worker.job_runner import JobRunner

log = logging.getLogger("lorafleet.worker")
CLAIM_BUDGET_S = 60.0


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self: Any, job_id: str) -> str:
    """Train the best queued job that fits this worker; ``job_id`` is only a hint.

    The message is a wake-up token and the database picks the job (``runs.claim_next``: fit,
    priority, per-owner fairness, age), so a GPU job's message picked up by a CPU worker does not
    strand it, and a high-priority job submitted later runs first. Idempotent by construction:
    the conditional claim on the job row (queued → running) lets exactly one worker through,
    whatever the broker re-delivers. A multi-node job's token brings this worker a seat in its
    gang instead (``shared.services.gangs``): it waits for the gang to fill (``worker.gang``),
    then runs its node of the job; a gang that does not fill in time is given up and the worker
    takes other work once. A token that finds nothing to run here is dropped
    ("skipped"); a job still queued without a message is re-published by the reaper.
    """
    settings = get_settings()
    if fleet.draining.is_set():
        # A draining worker takes nothing new; the message goes back for another worker (the
        # job it just released is often the one this message names).
        raise Reject("worker draining", requeue=True)
    worker_id = fleet.worker_id(self.request.hostname)
    skip: set[str] = set()
    for _ in range(2):  # a second claim only after giving up on a gang: take other work once
        offer = fleet.node_offer()
        claimed = _claim(worker_id, job_id, settings.lease_seconds, offer, skip)
        if claimed is None:
            log.info("woken by %s: no queued job fits this worker", job_id)
            return "skipped"
        gang: GangPlan | None = None
        if isinstance(claimed, Seat):
            fleet.set_current_job(claimed.job_id)
            wait = GangWait(claimed, offer, settings, skip=skip)
            try:
                gang = wait.run()
            except OperationalError:  # the database went away: the seat lapses by itself
                log.exception("lost the database while waiting for the gang of %s", claimed.job_id)
            if gang is None:
                fleet.set_current_job(None)
                if not wait.gave_up:
                    return "gang gone"
                skip |= wait.gave_up
                continue
            lease = Lease(gang.job_id, worker_id, gang.epoch, gang.slot)
            attempt = gang.attempt
        else:
            lease, attempt = claimed
        if lease.job_id != job_id:
            log.info("woken by %s; the database picked %s", job_id, lease.job_id)
        fleet.set_current_job(lease.job_id)
        try:
            return JobRunner(lease, attempt, settings, gang=gang).run()
        finally:
            fleet.set_current_job(None)
    return "skipped"


def _claim(
    worker_id: str, job_id: str, lease_s: float, offer: NodeOffer, skip: set[str]
) -> tuple[Lease, int] | Seat | None:
    """Claim a job (or a seat in a gang), riding out a database that is briefly unreachable.

    The task must not die of an OperationalError: if the database stays away past the budget the
    message is dropped; the job is still queued in the database and the reaper re-publishes it.
    """
    deadline = time.monotonic() + CLAIM_BUDGET_S
    delay = 0.5
    while True:
        try:
            with session_scope() as session:
                got = runs.claim_next(
                    session,
                    worker_id,
                    fleet.routing_capacity(),
                    lease_s,
                    preferred_job_id=job_id,
                    offer=offer,
                    skip=skip,
                )
                if got is None or isinstance(got, Seat):
                    return got
                return Lease.of(got), got.attempts
        except OperationalError as exc:
            if time.monotonic() > deadline:
                log.error(
                    "database unreachable for %.0f s; leaving %s queued", CLAIM_BUDGET_S, job_id
                )
                return None
            log.warning("claim failed, retrying in %.1f s: %s", delay, str(exc).splitlines()[0])
            time.sleep(delay)
            delay = min(5.0, delay * 2)
