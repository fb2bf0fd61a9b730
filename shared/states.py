"""The job state machine: every allowed transition lives in ``ALLOWED`` and nowhere else.

``running -> queued`` exists for one reason: a worker died (its lease expired) and the job is
retried from its last checkpoint. Final states have no way out.
"""

from __future__ import annotations

from enum import StrEnum

from shared.errors import Conflict


class JobStatus(StrEnum):
    """Lifecycle of a job; the database stores the string value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


QUEUED = JobStatus.QUEUED
RUNNING = JobStatus.RUNNING
SUCCEEDED = JobStatus.SUCCEEDED
FAILED = JobStatus.FAILED
CANCELLED = JobStatus.CANCELLED

ALL_STATES: tuple[JobStatus, ...] = tuple(JobStatus)
FINAL: frozenset[JobStatus] = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE: frozenset[JobStatus] = frozenset({QUEUED, RUNNING})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # failed from queued: the job was refused before any worker could start it (max attempts).
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    # queued from running: the worker was lost and the lease expired; the job is retried.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class WorkerStatus(StrEnum):
    """What a worker reports about itself; ``offline`` is also set by the reaper for silent ones."""

    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"


def can_transition(current: str, new: str) -> bool:
    """Whether ``current -> new`` is allowed (unknown states never are)."""
    try:
        return JobStatus(new) in ALLOWED[JobStatus(current)]
    except ValueError:
        return False


def check_transition(current: str, new: str) -> None:
    """Raise ``Conflict`` when ``current -> new`` is not an allowed transition."""
    if not can_transition(current, new):
        raise Conflict(f"job cannot go from {current} to {new}", code="invalid_transition")


def is_final(status: str) -> bool:
    """Whether a job in ``status`` will never change again."""
    return status in FINAL
