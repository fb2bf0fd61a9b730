"""Kept rank logs of a job's attempts: what ``GET /jobs/{id}/logs`` and ``lorafleet logs`` show.

The worker uploads the end of every rank's log (bounded) when an attempt ends, whatever its
outcome, under ``jobs/<job>/logs/attempt-<N>/rank<R>.log``; ``N`` is the attempt's claim number
(1 for the first claim, 2 for the next, also after a drain handed the job back), so attempts
never overwrite each other's logs.
"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.services.jobs import get_job
from shared.storage import Storage

_ATTEMPT = re.compile(r"/logs/attempt-(\d+)/(rank\d+\.log)$")
MAX_LOG_BYTES = 4 * 1024 * 1024  # what one response returns at most (the worker keeps 1 MiB/rank)


def logs_prefix(job_id: str, attempt: int) -> str:
    """Storage prefix of one attempt's rank logs (the worker writes, this module reads)."""
    return f"jobs/{job_id}/logs/attempt-{attempt}/"


def kept_attempts(storage: Storage, job_id: str) -> dict[int, list[str]]:
    """Attempt number -> its rank log keys, in rank order."""
    found: dict[int, list[str]] = {}
    for key in storage.list(f"jobs/{job_id}/logs/"):
        match = _ATTEMPT.search(key)
        if match:
            found.setdefault(int(match.group(1)), []).append(key)
    return {
        n: sorted(keys, key=lambda k: int(re.findall(r"\d+", k.rsplit("/", 1)[1])[0]))
        for n, keys in found.items()
    }


def attempt_logs(
    session: Session, storage: Storage, owner: str, job_id: str, attempt: int | None = None
) -> tuple[int, str]:
    """(attempt, text) of the owner's job: every rank's log of ``attempt`` (default the last)."""
    get_job(session, owner, job_id)
    attempts = kept_attempts(storage, job_id)
    if not attempts:
        raise NotFound(f"job {job_id} has no kept logs yet (they are kept when an attempt ends)")
    chosen = attempt if attempt is not None else max(attempts)
    if chosen not in attempts:
        raise NotFound(
            f"job {job_id} has no logs of attempt {chosen} "
            f"(kept: {', '.join(str(n) for n in sorted(attempts))})",
            param="attempt",
        )
    parts: list[str] = []
    budget = MAX_LOG_BYTES
    for key in attempts[chosen]:
        blob = b"".join(storage.open_stream(key))[-budget:] if budget > 0 else b""
        budget -= len(blob)
        parts.append(f"==> {key.rsplit('/', 1)[1]} (attempt {chosen}) <==\n")
        parts.append(blob.decode(errors="replace"))
        if not parts[-1].endswith("\n"):
            parts.append("\n")
    return chosen, "".join(parts)
