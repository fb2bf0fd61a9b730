"""Prometheus metrics, computed from the database at scrape time.

A fresh registry per scrape: the numbers are the truth shared by every API replica (job counts
live in the database), not per-process counters that would disagree between replicas.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from api.deps import SessionDep, metrics_access
from shared.models import utcnow
from shared.services import jobs as job_service
from shared.services.runs import WORKER_STATUSES, list_workers
from shared.states import ALL_STATES

router = APIRouter(tags=["metrics"], dependencies=[Depends(metrics_access)])


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep) -> Response:
    """Prometheus text exposition (unauthenticated: aggregate counts only)."""
    registry = CollectorRegistry()
    jobs_gauge = Gauge("lorafleet_jobs", "Jobs by state.", ["state"], registry=registry)
    counts = job_service.count_by_status(session)
    for state in ALL_STATES:
        jobs_gauge.labels(state=state.value).set(counts.get(state.value, 0))

    oldest = job_service.oldest_queued_at(session)
    age = Gauge(
        "lorafleet_oldest_queued_job_age_seconds",
        "Age of the longest-waiting queued job (0 when none).",
        registry=registry,
    )
    age.set((utcnow() - oldest).total_seconds() if oldest else 0.0)

    workers = list_workers(session)
    workers_gauge = Gauge("lorafleet_workers", "Workers by status.", ["status"], registry=registry)
    gpus_gauge = Gauge(
        "lorafleet_worker_gpus", "GPUs on workers that are not offline.", registry=registry
    )
    for status in WORKER_STATUSES:
        workers_gauge.labels(status=status).set(sum(w.status == status for w in workers))
    gpus_gauge.set(sum(w.gpus for w in workers if w.status != "offline"))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
