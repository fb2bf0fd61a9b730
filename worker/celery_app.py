"""The worker's Celery app: shared configuration plus the worker-side hooks (registry, reaper).

Started by ``lorafleet worker`` (which execs ``celery -A worker.celery_app:app worker`` with the
solo pool): the task runs in the worker's main process, so the training ranks it launches are
children of the process ops see and kill, and their parent-death signal fires when it dies.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from shared.config import get_settings
from shared.queueing import broker_kind, make_celery

app = make_celery(get_settings())
app.conf.update(
    include=["worker.tasks"],
    # The solo pool runs one training job at a time in the main process.
    worker_pool="solo",
    worker_concurrency=1,
)
if not broker_kind(get_settings().broker_url).has_server:
    # The no-server brokers have no fanout exchange: no remote control, no events.
    app.conf.worker_enable_remote_control = False
    app.conf.worker_send_task_events = False


@worker_ready.connect
def _start_fleet_threads(sender: Any = None, **_: Any) -> None:
    from worker.fleet import start_background

    hostname = getattr(sender, "hostname", None) or "worker"
    start_background(hostname)


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    """Warm shutdown (SIGTERM): stop taking jobs; the running one checkpoints and is requeued."""
    from worker.fleet import draining

    # Only a flag: this runs inside a signal handler. The heartbeat thread reports `draining`.
    draining.set()


@worker_shutdown.connect
def _stop_fleet_threads(**_: Any) -> None:
    from worker.fleet import stop_background

    stop_background()
