"""Why a run failed, and whether trying again can help: the engine's side of failure handling.

Two classes matter to the service. A *user* failure (bad input, settings the model refuses, an
out-of-memory end for these settings) fails the job at once with a message that says what to
change: retrying cannot help. An *infrastructure* failure (a rank killed by a signal, disk full,
a storage or network error, a gloo/NCCL collective that timed out or lost a peer) is retried from
the last checkpoint. Unknown crashes count as infrastructure: a retry costs one checkpoint
interval, a wrongly failed job costs the user the whole run.

The message is never a bare exit status: it names the cause and quotes the end of the failing
rank's traceback (library ``warnings.warn(`` noise left out).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

TRACEBACK_LINES = 8


class FailureClass(StrEnum):
    USER = "user"  # fail now: the message says what to fix
    INFRASTRUCTURE = "infrastructure"  # retry from the last checkpoint


@dataclass(frozen=True)
class Failure:
    """A classified failure: ``code`` for the job's error, ``message`` for the user."""

    code: str
    kind: FailureClass
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind == FailureClass.INFRASTRUCTURE


_OOM = re.compile(
    r"CUDA out of memory|OutOfMemoryError|MemoryError|DefaultCPUAllocator: can't allocate"
    r"|not enough memory|Cannot allocate memory"
)
_DISK = re.compile(r"No space left on device|ENOSPC|Disk quota exceeded")
_COLLECTIVE = re.compile(
    r"(gloo|nccl|ProcessGroup)[^\n]*(timeout|timed out|Connection closed|Connection reset"
    r"|peer|abort)",
    re.IGNORECASE,
)
# warnings.warn( lines, warning texts, tqdm progress bars, blank lines
_NOISE = re.compile(r"^\s*warnings\.warn\(|Warning: |\d+%\||it/s\]|^\s*$")


def traceback_tail(log_text: str, lines: int = TRACEBACK_LINES) -> str:
    """The last meaningful lines of a rank log: the traceback's end, without warning noise."""
    kept = [line.rstrip() for line in log_text.splitlines() if not _NOISE.search(line)]
    if "Traceback (most recent call last):" in log_text:
        start = max(i for i, line in enumerate(kept) if line.startswith("Traceback"))
        kept = kept[start:]
    return "\n".join(kept[-lines:])


def read_log(path: Path, limit: int = 64 * 1024) -> str:
    """The end of a rank log (bounded), or "" when it does not exist."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, 2)
            size = stream.tell()
            stream.seek(max(0, size - limit))
            return stream.read().decode(errors="replace")
    except OSError:
        return ""


def classify(
    exit_code: int | None,
    error_code: str | None,
    error_message: str | None,
    failed_rank: int | None,
    log_text: str,
) -> Failure:
    """Classify a failed run from what its ranks left: exit status, error record, rank log."""
    tail = traceback_tail(log_text)
    rank = f"rank {failed_rank}" if failed_rank is not None else "a rank"
    evidence = f"{error_message or ''}\n{log_text[-20000:]}"
    if error_code == "invalid_job":
        return Failure("invalid_job", FailureClass.USER, error_message or "invalid job settings")
    if error_code == "out_of_memory":
        return Failure("out_of_memory", FailureClass.USER, error_message or "out of memory")
    if _OOM.search(evidence):
        return Failure(
            "out_of_memory",
            FailureClass.USER,
            f"{rank} ran out of memory; lower training.batch_size or training.max_seq_length, "
            f"or enable training.gradient_checkpointing. Last lines:\n{tail}",
        )
    if _DISK.search(evidence):
        return Failure(
            "disk_full", FailureClass.INFRASTRUCTURE, f"{rank}: disk full. Last lines:\n{tail}"
        )
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        why = " (the kernel's OOM killer or an operator)" if name == "SIGKILL" else ""
        return Failure(
            "rank_killed",
            FailureClass.INFRASTRUCTURE,
            f"{rank} was killed by {name}{why}" + (f". Last lines:\n{tail}" if tail else ""),
        )
    if _COLLECTIVE.search(evidence):
        return Failure(
            "collective_failed",
            FailureClass.INFRASTRUCTURE,
            f"{rank}: a collective (gloo/NCCL) failed or timed out. Last lines:\n{tail}",
        )
    detail = error_message or tail or f"exit status {exit_code}"
    if error_message and tail and error_message not in tail:
        detail = f"{error_message}\n{tail}"
    return Failure(
        error_code or "training_failed",
        FailureClass.INFRASTRUCTURE,
        f"{rank} failed (exit status {exit_code}): {detail}",
    )
