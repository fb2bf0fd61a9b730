"""The Celery app both sides agree on, and publishing a job id.

The API publishes by task *name* so it never imports the worker (nor torch). The broker only
carries job ids: the database row is the truth, and a lost message is re-published by the reaper.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery

from shared.config import Settings, get_settings

TRAIN_TASK = "lorafleet.train_job"
DEFAULT_QUEUE = "lorafleet"


class BrokerKind(StrEnum):
    """Which kind of broker a URL names: what it can do (remote control, queue lengths) differs."""

    REDIS = "redis"
    AMQP = "amqp"
    FILESYSTEM = "filesystem"
    SQLALCHEMY = "sqlalchemy"
    OTHER = "other"

    @property
    def has_server(self) -> bool:
        """A real server with fanout: remote control and task events work."""
        return self in (BrokerKind.REDIS, BrokerKind.AMQP)


def broker_kind(url: str | None) -> BrokerKind:
    """The kind of broker ``url`` names (the one place that reads URL schemes)."""
    scheme = (url or "").split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return BrokerKind.REDIS
    if scheme in ("amqp", "amqps", "pyamqp"):
        return BrokerKind.AMQP
    if scheme == "filesystem":
        return BrokerKind.FILESYSTEM
    if scheme.startswith("sqla+") or scheme == "sqlalchemy":
        return BrokerKind.SQLALCHEMY
    return BrokerKind.OTHER


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options; the embedded filesystem broker keeps its folders in DATA_DIR."""
    kind = broker_kind(settings.broker_url)
    if kind == BrokerKind.FILESYSTEM:
        folder = settings.broker_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        return {
            # Without control_folder kombu writes its fanout exchange files into ./control of
            # whatever directory the process was started from.
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.5,
        }
    if kind == BrokerKind.REDIS:
        # Training runs for hours: never let Redis re-deliver a running task (celery#5935).
        # Recovery of dead workers' jobs comes from the database lease instead.
        return {"visibility_timeout": 7 * 24 * 3600}
    return {}


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured for long, idempotent training tasks."""
    settings = settings or get_settings()
    app = Celery("lorafleet", broker=settings.broker_url)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_heartbeat=0,
        task_send_sent_event=False,
    )
    return app


@lru_cache
def _publisher() -> Celery:
    return make_celery()


def reset_publisher() -> None:
    _publisher.cache_clear()


def publish_job(
    job_id: str, queue: str = DEFAULT_QUEUE, priority: int = 0, tokens: int = 1
) -> None:
    """Send the job id to the workers. Call only after the job row is committed.

    ``tokens``: how many workers to wake (one per node of a multi-node job: each of its workers
    claims a seat of the gang). A token that finds nothing to do is dropped by its worker.
    """
    for _ in range(max(1, tokens)):
        _publisher().send_task(TRAIN_TASK, args=[job_id], queue=queue, retry=True)


_JOB_ID = re.compile(rb"ftjob-[0-9a-f]+")


def pending_job_ids(
    settings: Settings | None = None, queues: tuple[str, ...] = (DEFAULT_QUEUE,)
) -> set[str] | None:
    """Job ids that have a message waiting in (or reserved from) the broker; None if unknowable.

    Lets the reaper re-publish only jobs whose message is really gone (a Redis flushed or
    restarted without persistence), instead of piling duplicates behind a long training run.
    """
    settings = settings or get_settings()
    url = settings.broker_url or ""
    kind = broker_kind(url)
    found: set[str] = set()
    if kind == BrokerKind.REDIS:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            for queue in queues:
                for raw in client.lrange(queue, 0, -1):  # type: ignore[union-attr]
                    found.update(
                        m.decode()
                        for m in _JOB_ID.findall(raw if isinstance(raw, bytes) else raw.encode())
                    )
            for raw in client.hvals("unacked"):  # type: ignore[union-attr]
                found.update(
                    m.decode()
                    for m in _JOB_ID.findall(raw if isinstance(raw, bytes) else raw.encode())
                )
        finally:
            client.close()
        return found
    if kind == BrokerKind.FILESYSTEM:
        folder = Path(broker_options(settings)["data_folder_in"])
        for item in folder.iterdir():
            try:
                found.update(m.decode() for m in _JOB_ID.findall(item.read_bytes()))
            except OSError:  # consumed while we looked
                continue
        return found
    return None
