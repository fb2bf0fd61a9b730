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
    """Train one job if this worker wins the claim; a duplicate delivery drops out here.

    Idempotent by construction: the conditional claim on the job row (queued → running) lets
    exactly one delivery through, whatever the broker re-delivers.
    """
    settings = get_settings()
    worker_id = fleet.worker_id(self.request.hostname)
    with session_scope() as session:
        job = runs.claim_job(session, job_id, worker_id, settings.lease_seconds)
        claimed = job is not None
        attempt = job.attempts if job is not None else 0
    if not claimed:
        log.info("job %s not claimable here (already taken, finished or cancelled)", job_id)
        return "skipped"
    fleet.set_current_job(job_id)
    try:
        return JobRunner(job_id, worker_id, attempt, settings).run()
    finally:
        fleet.set_current_job(None)
