"""Run one claimed job: fetch inputs, launch the engine's ranks, publish progress, store results.

The engine writes progress as JSON lines; this runner tails them, renews the lease, watches the
cancel flag, uploads each checkpoint to object storage (the next attempt may run on another
machine), and records the outcome. It is the only place that joins the engine, the database and
storage together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.db import session_scope
from shared.models import File, Job
from shared.queueing import publish_job
from shared.services import runs, webhooks
from shared.services.fleet import locate_base_model
from shared.spec import JobSpec
from shared.storage import Storage, storage_from_url
from worker import fleet
from worker.training import events
from worker.training.checkpoints import CheckpointPolicy
from worker.training.launch import EXIT_PREEMPTED, device_count, iter_progress, launch

log = logging.getLogger("lorafleet.runner")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "README.md")


class JobLost(Exception):
    """The row is no longer ours (lease taken over, or the job was cancelled/finished)."""


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"jobs/{job_id}/checkpoints/step_{step}/"


def adapter_key(job_id: str) -> str:
    return f"jobs/{job_id}/adapter.tar.gz"


def make_adapter_tarball(folder: Path, dest: Path) -> tuple[str, int]:
    """A .tar.gz of the peft folder (+ manifest) with a top-level ``adapter/`` directory."""
    with tarfile.open(dest, "w:gz") as tar:
        for name in ADAPTER_FILES:
            if (folder / name).exists():
                tar.add(folder / name, arcname=f"adapter/{name}")
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    return digest, dest.stat().st_size


class LeaseKeeper(threading.Thread):
    """Renews the job's lease from its own thread, so a slow step of the runner (a first torch
    import, a multi-GB checkpoint upload) can never let the lease lapse while the worker lives;
    and notices a cancel request or the loss of the job."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_seconds = settings.lease_seconds
        self.period = max(0.2, min(2.0, settings.lease_seconds / 4))
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                with session_scope() as session:
                    ours = runs.renew_lease(
                        session, self.job_id, self.worker_id, self.lease_seconds
                    )
                    cancel = runs.cancel_requested(session, self.job_id)
            except Exception:  # a database hiccup: try again next period
                log.exception("lease renewal failed for %s", self.job_id)
                continue
            if cancel:
                self.cancelled.set()
            if not ours:
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop.set()


class JobRunner:
    """One attempt of one job on this worker."""

    def __init__(self, job_id: str, worker_id: str, attempt: int, settings: Settings) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.attempt = attempt
        self.settings = settings
        self.storage: Storage = storage_from_url(
            settings.storage_url or "", settings.s3_endpoint_url
        )
        self.policy = CheckpointPolicy.with_keep(settings.checkpoints_keep)
        self.work = settings.data_dir.resolve() / "work" / job_id / f"attempt-{attempt}"
        self._last_progress_write = 0.0
        self._pending_metrics: list[dict[str, Any]] = []
        self._error: dict[str, str] | None = None
        self._manifest: dict[str, Any] | None = None
        self._last_step: int | None = None
        self._drain_sent = False

    # ------------------------------------------------------------------ helpers
    def _event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with session_scope() as session:
            runs.add_event(session, self.job_id, level, message, data)

    def _finish(self, status: str, **fields: Any) -> None:
        with session_scope() as session:
            done = runs.finish_job(session, self.job_id, self.worker_id, status, **fields)
        if done:  # only the attempt that set the final state announces it
            webhooks.notify_final(self.job_id, self.settings)

    def _fetch_inputs(self, spec: JobSpec) -> tuple[JobSpec, str]:
        """Download dataset files; resolve the base model to a local folder or hub id."""
        inputs = self.work / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        local: dict[str, str | None] = {"training_file": None, "validation_file": None}
        with session_scope() as session:
            for field in local:
                file_id = getattr(spec, field)
                if not file_id:
                    continue
                record = session.get(File, file_id)
                if record is None:
                    raise ValueError(f"{field} {file_id} no longer exists")
                target = inputs / f"{field}.jsonl"
                self.storage.get_file(record.storage_key, target)
                local[field] = str(target)
        where = locate_base_model(spec.base_model, self.settings)
        model_path = str(where.resolve()) if isinstance(where, Path) else where
        updates: dict[str, Any] = {
            "training_file": local["training_file"],
            "validation_file": local["validation_file"],
        }
        return self.policy.apply(spec.model_copy(update=updates)), model_path

    def _fetch_checkpoint(self) -> tuple[Path, int] | None:
        with session_scope() as session:
            latest = runs.latest_checkpoint(session, self.job_id)
            found = (latest.step, latest.storage_key) if latest is not None else None
        if found is None:
            return None
        step, prefix = found
        target = self.work / "resume" / f"step_{step}"
        target.mkdir(parents=True, exist_ok=True)
        for key in self.storage.list(prefix):
            self.storage.get_file(key, target / key[len(prefix) :].lstrip("/"))
        return target, step

    def _upload_checkpoint(self, record: events.CheckpointSaved) -> None:
        path = Path(record.path)
        step = record.step
        prefix = checkpoint_prefix(self.job_id, step)
        digest = hashlib.sha256()
        try:
            for item in sorted(path.iterdir()):
                digest.update(item.read_bytes())
                self.storage.put_file(prefix + item.name, item)
        except FileNotFoundError:  # pruned by the engine before we got to it: a newer one exists
            return
        # Recorded only once every file is up: the row is the commit point of a checkpoint.
        with session_scope() as session:
            runs.record_checkpoint(
                session, self.job_id, step, prefix, digest.hexdigest(), record.state
            )
            old = runs.prune_checkpoints(session, self.job_id, self.policy.keep)
        for old_prefix in old:
            for key in self.storage.list(old_prefix):
                self.storage.delete(key)
        self._event(f"checkpoint saved at step {step}", data={"step": step})

    # ------------------------------------------------------------------ progress
    def _handle(self, record: events.Record) -> None:
        if isinstance(record, events.Event):
            self._event(record.message, record.level, record.data)
        elif isinstance(record, events.Resumed):
            self._event(
                f"resumed from step {record.step} (attempt {self.attempt})",
                data={"step": record.step},
            )
        elif isinstance(record, events.Step):
            self._pending_metrics.append(record.metric_point())
            self._last_step = record.step
            self._flush_progress(record.snapshot(), force=record.step == record.total_steps)
        elif isinstance(record, events.CheckpointSaved):
            self._flush_progress(None, force=True)
            self._upload_checkpoint(record)
        elif isinstance(record, events.Preempted):
            self._last_step = record.step
        elif isinstance(record, events.Done):
            self._manifest = record.manifest
        elif isinstance(record, events.Error):
            self._error = {"code": record.code, "message": record.message}

    def _flush_progress(self, point: dict[str, Any] | None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress_write < self.settings.progress_interval_seconds:
            return
        if not self._pending_metrics:
            return
        latest = point or self._pending_metrics[-1]
        with session_scope() as session:
            runs.add_metrics(session, self.job_id, self._pending_metrics)
            runs.record_progress(session, self.job_id, latest)
        self._pending_metrics = []
        self._last_progress_write = now

    # ------------------------------------------------------------------ run
    def run(self) -> str:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.lease = LeaseKeeper(self.job_id, self.worker_id, self.settings)
        self.lease.start()
        try:
            return self._run()
        finally:
            self.lease.stop()
            shutil.rmtree(self.work.parent, ignore_errors=True)

    def _run(self) -> str:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            spec = JobSpec.model_validate(job.spec)
        try:
            local_spec, model_path = self._fetch_inputs(spec)
            resume = self._fetch_checkpoint()
        except Exception as exc:
            log.exception("could not fetch inputs of %s", self.job_id)
            self._finish("failed", error_code="input_unavailable", error_message=str(exc))
            return "failed"
        spec_path = self.work / "spec.json"
        spec_path.write_text(local_spec.model_dump_json())
        gpus = device_count()
        nproc = gpus or self.settings.worker_procs
        if isinstance(spec.resources.gpus, int) and gpus:
            nproc = max(1, min(nproc, spec.resources.gpus))
        if resume is None:
            self._event(
                f"started on {self.worker_id} (attempt {self.attempt}, {nproc} "
                f"{'GPU' if gpus else 'CPU'} process(es))"
            )
        progress_file = self.work / "progress.jsonl"
        out_dir = self.work / "adapter"
        group = launch(
            spec_path,
            out_dir,
            nproc,
            work_dir=self.work,
            model_path=model_path,
            progress_file=progress_file,
            checkpoint_dir=self.work / "checkpoints",
            resume_from=resume[0] if resume else None,
            keep_checkpoints=self.policy.keep,
        )
        code: int | None = None
        try:

            def stopped() -> bool:
                nonlocal code
                code = group.poll()
                if self.lease.cancelled.is_set():
                    group.terminate(grace_seconds=2.0)
                    raise InterruptedError
                if self.lease.lost.is_set():
                    group.kill()
                    raise JobLost
                if fleet.draining.is_set() and not self._drain_sent and code is None:
                    self._drain_sent = True
                    if self._last_step is None:  # not training yet: nothing worth saving
                        group.terminate(grace_seconds=2.0)
                        code = EXIT_PREEMPTED
                    else:  # every rank checkpoints after the same step, then exits 75
                        group.signal_all(signal.SIGUSR1)
                return code is not None

            for record in iter_progress(progress_file, stopped):
                self._handle(record)
            self._flush_progress(None, force=True)
        except InterruptedError:
            self._flush_progress(None, force=True)
            self._finish("cancelled")
            return "cancelled"
        except JobLost:
            log.warning("job %s is no longer ours; dropped", self.job_id)
            return "lost"
        finally:
            if group.poll() is None:
                group.kill()
        if code == 0 and (out_dir / "adapter_model.safetensors").exists():
            return self._succeed(out_dir)
        if code == EXIT_PREEMPTED:
            with session_scope() as session:
                released = runs.release_job(session, self.job_id, self.worker_id, self._last_step)
            if released:
                publish_job(self.job_id, fleet.queue_of(self.job_id))
            return "released"

        error = self._error or {
            "code": "training_failed",
            "message": (group.log_tail(1500).strip().splitlines() or ["exit code " + str(code)])[
                -1
            ],
        }
        log.error("job %s failed: %s", self.job_id, error)
        self._finish("failed", error_code=error["code"], error_message=error["message"])
        return "failed"

    def _succeed(self, out_dir: Path) -> str:
        tarball = self.work / "adapter.tar.gz"
        sha, size = make_adapter_tarball(out_dir, tarball)
        key = adapter_key(self.job_id)
        self.storage.put_file(key, tarball)
        manifest = self._manifest or json.loads((out_dir / "manifest.json").read_text())
        self._finish(
            "succeeded",
            adapter_key=key,
            adapter_sha256=sha,
            adapter_bytes=size,
            manifest=manifest,
            trained_tokens=int(manifest.get("trained_tokens") or 0),
        )
        return "succeeded"
