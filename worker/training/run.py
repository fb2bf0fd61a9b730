"""One training run, start to end: the orchestrator both ``lorafleet train`` and the job runner use.

A :class:`TrainingRun` writes the spec, launches the ranks (``launch.py``), tails their typed
progress (``events.py``) into the caller's ``on_record``, obeys the caller's stop requests
(cancel, drain, lease lost) and returns an explicit :class:`RunResult`. It knows nothing of
databases, Celery or storage: the caller decides what an outcome means for a job.

Why a polled ``control`` function and no exceptions: the caller's view (a lease thread, a signal
handler) changes between polls; returning a value keeps the loop's exits in one place, and the
rank group is always ended on the way out, whatever happened.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared.spec import JobSpec
from worker.training import events
from worker.training.checkpoints import CheckpointPolicy
from worker.training.launch import EXIT_PREEMPTED, RankGroup, Rendezvous, launch


class Outcome(StrEnum):
    """How a run ended."""

    SUCCEEDED = "succeeded"  # every rank exited 0 and the adapter is written
    FAILED = "failed"  # a rank failed (see RunResult.error / exit_code)
    CANCELLED = "cancelled"  # the caller asked to cancel; ranks ended
    PREEMPTED = "preempted"  # checkpointed on a drain request (exit 75), or stopped before step 1
    LOST = "lost"  # the caller lost the right to run (lease gone); ranks killed at once


class StopRequest(StrEnum):
    """What a caller's ``control`` may ask for between polls."""

    CANCEL = "cancel"
    DRAIN = "drain"
    LOST = "lost"


@dataclass
class RunResult:
    """What happened; ``error`` is the engine's own error record when it wrote one."""

    outcome: Outcome
    exit_code: int | None
    last_step: int | None = None
    manifest: dict[str, Any] | None = None
    error: events.Error | None = None
    log_files: list[Path] = field(default_factory=list)
    failed_rank: int | None = None


class MemoryGuard:
    """Ends a run whose ranks together use more than ``limit_bytes`` of resident memory.

    Why a watchdog: one job must never take the host down (the kernel's OOM killer picks a
    victim of its own, possibly the worker or the database). An RLIMIT_AS bound breaks torch,
    which reserves far more address space than it touches, and cgroups are rarely writable in a
    container; polling the ranks' RSS (psutil, every poll of the run) works everywhere. A spike
    faster than one poll can still reach the kernel; the bound leaves headroom for that.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.peak_bytes = 0

    def rss(self, group: RankGroup) -> int:
        import psutil

        total = 0
        for proc in group.procs:
            try:
                parent = psutil.Process(proc.pid)
                members = [parent, *parent.children(recursive=True)]
            except psutil.Error:
                continue
            for member in members:
                try:
                    total += member.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def __call__(self, group: RankGroup) -> str | None:
        used = self.rss(group)
        self.peak_bytes = max(self.peak_bytes, used)
        return "out_of_memory" if used > self.limit_bytes else None


@dataclass
class TrainingRun:
    """Everything one run needs; :meth:`run` blocks until it ends.

    ``work_dir`` holds this run's own files (spec, progress, rank logs) and nothing else's.
    ``data_cache_dir`` is a per-JOB folder for prepared data shared by every attempt (passed to
    the engine as ``--cache-dir`` once the engine has that flag; None: the engine decides).
    """

    spec: JobSpec
    model_path: str
    work_dir: Path
    out_dir: Path
    nproc: int
    resume_from: Path | None = None
    checkpoint_dir: Path | None = None
    policy: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    data_cache_dir: Path | None = None
    rendezvous: Rendezvous | None = None  # this host's part of a multi-node world (launch.py)
    init_adapter: Path | None = None  # training.init_adapter, downloaded (None: the spec's path)
    poll_seconds: float = 0.2
    cancel_grace_seconds: float = 2.0
    group: RankGroup | None = field(default=None, init=False)

    @property
    def progress_file(self) -> Path:
        return self.work_dir / "progress.jsonl"

    def start(self) -> RankGroup:
        """Write the spec and launch the ranks (``run`` calls this)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.work_dir / "spec.json"
        spec_path.write_text(self.policy.apply(self.spec).model_dump_json())
        self.group = launch(
            spec_path,
            self.out_dir,
            self.nproc,
            work_dir=self.work_dir,
            model_path=self.model_path,
            progress_file=self.progress_file,
            checkpoint_dir=self.checkpoint_dir,
            resume_from=self.resume_from,
            keep_checkpoints=self.policy.keep,
            cache_dir=self.data_cache_dir,
            rendezvous=self.rendezvous,
            init_adapter=self.init_adapter,
        )
        return self.group

    def run(
        self,
        on_record: Callable[[events.Record], None],
        control: Callable[[], StopRequest | None] = lambda: None,
        watchdog: Callable[[RankGroup], str | None] = lambda _group: None,
    ) -> RunResult:
        """Launch, tail, obey ``control``; returns how it ended. Ranks never outlive this call.

        ``watchdog`` may end the run from outside the ranks (e.g. a memory bound); the reason it
        returns becomes a failed outcome with that reason as the error code.
        """
        group = self.start()
        tail = events.Tail(self.progress_file)
        result = RunResult(Outcome.FAILED, None, log_files=list(group.log_files))
        drain_sent = False
        stopped: Outcome | None = None
        try:
            while True:
                code = group.poll()
                self._drain(tail, result, on_record)
                if code is not None:
                    result.exit_code = code
                    break
                request = control()
                if request == StopRequest.LOST:
                    group.kill()  # someone else may already train this job: stop now
                    stopped = Outcome.LOST
                    break
                if request == StopRequest.CANCEL:
                    group.terminate(grace_seconds=self.cancel_grace_seconds)
                    stopped = Outcome.CANCELLED
                    break
                if request == StopRequest.DRAIN and not drain_sent:
                    drain_sent = True
                    if result.last_step is None:  # not training yet: nothing worth saving
                        group.terminate(grace_seconds=self.cancel_grace_seconds)
                        stopped = Outcome.PREEMPTED
                        break
                    group.signal_all(signal.SIGUSR1)  # every rank checkpoints, then exits 75
                reason = watchdog(group)
                if reason is not None:
                    group.kill()
                    result.exit_code = group.poll()
                    result.error = result.error or events.Error(code=reason, message=reason)
                    break
                time.sleep(self.poll_seconds)
            self._drain(tail, result, on_record)
        finally:
            if group.poll() is None:
                group.kill()
        result.failed_rank = group.failed_rank()
        if stopped is not None:
            result.outcome = stopped
        elif result.exit_code == 0 and (self.out_dir / "adapter_model.safetensors").exists():
            result.outcome = Outcome.SUCCEEDED
        elif result.exit_code == EXIT_PREEMPTED:
            result.outcome = Outcome.PREEMPTED
        return result

    @staticmethod
    def _drain(
        tail: events.Tail, result: RunResult, on_record: Callable[[events.Record], None]
    ) -> None:
        for record in tail.read():
            if (
                isinstance(record, events.Step | events.Preempted)
                or isinstance(record, events.Resumed)
                and result.last_step is None
            ):
                result.last_step = record.step
            elif isinstance(record, events.Done):
                result.manifest = record.manifest
            elif isinstance(record, events.Error):
                result.error = record
            on_record(record)
