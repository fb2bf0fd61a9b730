"""Celery glue: the task takes a job id, claims the row, runs it, records the outcome."""

from __future__ import annotations

import logging
from typing import Any

from shared.config import get_settings
from shared.db import session_scope
from shared.queueing import TRAIN_TASK
from shared.services import runs
from worker import fleet
from worker.celery_app import app
from worker.job_runner import JobRunner

log = logging.getLogger("lorafleet.worker")


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self: Any, job_id: str) -> str:
    """Train the best queued job that fits this worker; ``job_id`` is only a hint.

    The message is a wake-up token and the database picks the job (``runs.claim_next``: fit,
    priority, per-owner fairness, age), so a GPU job's message picked up by a CPU worker does not
    strand it, and a high-priority job submitted later runs first. Idempotent by construction:
    the conditional claim on the job row (queued → running) lets exactly one worker through,
    whatever the broker re-delivers. A token that finds nothing to run here is dropped
    ("skipped"); a job still queued without a message is re-published by the reaper.
    """
    settings = get_settings()
    worker_id = fleet.worker_id(self.request.hostname)
    with session_scope() as session:
        job = runs.claim_next(
            session,
            worker_id,
            fleet.routing_capacity(),
            settings.lease_seconds,
            preferred_job_id=job_id,
        )
        claimed = job.id if job is not None else None
        attempt = job.attempts if job is not None else 0
    if claimed is None:
        log.info("woken by %s: no queued job fits this worker", job_id)
        return "skipped"
    if claimed != job_id:
        log.info("woken by %s; the database picked %s", job_id, claimed)
    job_id = claimed
    fleet.set_current_job(job_id)
    try:
        return JobRunner(job_id, worker_id, attempt, settings).run()
    finally:
        fleet.set_current_job(None)
