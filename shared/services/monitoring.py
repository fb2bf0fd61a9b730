"""Prometheus metrics computed from the database at scrape time (``GET /metrics``).

Why from the database and not counters in the worker: every API replica then reports the same
numbers (the rows are shared), nothing is lost when a worker dies or restarts, and there is no
push gateway to run. The histograms are rebuilt from the finished jobs' timestamps on every
scrape; they only grow as jobs finish, so Prometheus' ``rate()`` / ``histogram_quantile()`` work
as on a live histogram. The cost is one scan of three timestamp columns of the jobs that ever
started (a few ms per 10,000 jobs); prune old job rows if that ever matters.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.models import Job, utcnow
from shared.queueing import BrokerKind, broker_kind
from shared.services.fleet import list_workers
from shared.states import ALL_STATES, FINAL, QUEUED, WorkerStatus

log = logging.getLogger(__name__)

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


def _histogram(
    name: str,
    doc: str,
    series: dict[tuple[str, ...], list[float]],
    labels: Sequence[str],
    bounds: Sequence[float],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for label_values, values in sorted(series.items()):
        values.sort()
        buckets = [(str(b), float(bisect.bisect_right(values, b))) for b in bounds]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric(list(label_values), buckets, sum_value=float(sum(values)))
    return family


def broker_lengths(settings: Settings, queues: Sequence[str]) -> dict[str, int] | None:
    """Messages waiting per queue in Redis; None for the embedded brokers (or Redis down)."""
    url = settings.broker_url or ""
    if broker_kind(url) != BrokerKind.REDIS:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return {q: int(client.llen(q)) for q in queues}  # type: ignore[arg-type]
    except redis.RedisError:
        log.warning("could not read queue lengths from the broker")
        return None
    finally:
        client.close()


class FleetCollector(Collector):
    """Yields every lorafleet metric from one database session (see the module docstring)."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._timings()
        yield from self._workers()

    def _jobs(self) -> Iterator[Metric]:
        session = self.session
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("lorafleet_jobs", "Jobs by state.", labels=["state"])
        for state in ALL_STATES:
            jobs.add_metric([state.value], float(counts.get(state.value, 0)))
        yield jobs

        depth: dict[str, int] = dict(
            session.execute(  # type: ignore[arg-type]
                select(Job.queue, func.count())
                .where(Job.status == QUEUED.value)
                .group_by(Job.queue)
            ).all()
        )
        queues = sorted(set(depth) | {"lorafleet"})
        gauge = GaugeMetricFamily(
            "lorafleet_queue_depth", "Queued jobs per queue (database).", labels=["queue"]
        )
        for queue in queues:
            gauge.add_metric([queue], float(depth.get(queue, 0)))
        yield gauge
        lengths = broker_lengths(self.settings, queues)
        if lengths is not None:
            broker = GaugeMetricFamily(
                "lorafleet_broker_queue_length",
                "Messages waiting in the broker per queue (Redis only).",
                labels=["queue"],
            )
            for queue, length in lengths.items():
                broker.add_metric([queue], float(length))
            yield broker

        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == QUEUED.value))
        yield GaugeMetricFamily(
            "lorafleet_oldest_queued_job_age_seconds",
            "Age of the longest-waiting queued job (0 when none).",
            value=(utcnow() - oldest).total_seconds() if oldest else 0.0,
        )
        tokens = session.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0)))
        total = CounterMetricFamily(
            "lorafleet_trained_tokens", "Tokens trained by succeeded jobs (all epochs)."
        )
        total.add_metric([], float(tokens or 0))
        yield total

    def _timings(self) -> Iterator[Metric]:
        rows = self.session.execute(
            select(Job.status, Job.created_at, Job.started_at, Job.finished_at).where(
                Job.started_at.is_not(None)
            )
        ).all()
        durations: dict[tuple[str, ...], list[float]] = {}
        waits: dict[tuple[str, ...], list[float]] = {(): []}
        final = {s.value for s in FINAL}
        for status, created, started, finished in rows:
            if started is None:  # filtered in SQL; narrows the type
                continue
            waits[()].append(max(0.0, (started - created).total_seconds()))
            if status in final and finished is not None:
                seconds = max(0.0, (finished - started).total_seconds())
                durations.setdefault((status,), []).append(seconds)
        yield _histogram(
            "lorafleet_job_duration_seconds",
            "Finished jobs: first start to end (all attempts), by final state.",
            durations,
            ["state"],
            DURATION_BUCKETS,
        )
        yield _histogram(
            "lorafleet_job_queue_wait_seconds",
            "Jobs that started: submission to first start.",
            waits,
            [],
            WAIT_BUCKETS,
        )

    def _workers(self) -> Iterator[Metric]:
        workers = list_workers(self.session, self.settings)
        by_status = GaugeMetricFamily(
            "lorafleet_workers",
            "Registered workers by status (offline: no heartbeat for 3 leases).",
            labels=["status"],
        )
        for status in WorkerStatus:
            by_status.add_metric([status], float(sum(s == status for _, s in workers)))
        yield by_status
        alive = [w for w, s in workers if s != WorkerStatus.OFFLINE]
        yield GaugeMetricFamily(
            "lorafleet_worker_gpus",
            "GPUs on workers that are not offline.",
            value=float(sum(w.gpus for w in alive)),
        )
        memory = GaugeMetricFamily(
            "lorafleet_worker_gpu_memory_bytes",
            "Memory of one GPU of each live GPU worker.",
            labels=["worker", "gpu_type"],
        )
        for w in alive:
            if w.gpu_memory_bytes is not None:
                memory.add_metric([w.id, w.gpu_type or ""], float(w.gpu_memory_bytes))
        yield memory
        # Live use per device, from the heartbeat; CPU workers report no device, so no series.
        used = GaugeMetricFamily(
            "lorafleet_worker_gpu_memory_used_bytes",
            "Device memory in use (all processes), per GPU of each live worker.",
            labels=["worker", "device", "uuid"],
        )
        busy = GaugeMetricFamily(
            "lorafleet_worker_gpu_utilization_ratio",
            "GPU utilisation (0-1, NVML), per GPU of each live worker.",
            labels=["worker", "device", "uuid"],
        )
        for w in alive:
            for device in w.gpu_stats or []:
                labels = [w.id, str(device.get("index")), str(device.get("uuid"))]
                used.add_metric(labels, float(device.get("memory_used_bytes") or 0))
                if device.get("utilization_percent") is not None:
                    busy.add_metric(labels, float(device["utilization_percent"]) / 100.0)
        yield used
        yield busy

    def describe(self) -> Iterator[Any]:
        return iter(())
