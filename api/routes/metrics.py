"""Prometheus metrics, computed from the database at scrape time.

A fresh registry per scrape: the numbers are the truth shared by every API replica (job counts
live in the database), not per-process counters that would disagree between replicas. What is
exported and why: ``shared/services/monitoring.py`` and docs/operators.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.deps import SessionDep, SettingsDep, metrics_access
from shared.services.monitoring import FleetCollector

router = APIRouter(tags=["metrics"], dependencies=[Depends(metrics_access)])


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus text exposition (admin key, unless LORAFLEET_METRICS_PUBLIC=true)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(session, settings))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
