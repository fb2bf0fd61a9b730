"""Run one claimed attempt of a job: the glue between the engine's run, the database and storage.

An attempt holds a :class:`~shared.services.runs.Lease` (job, worker, epoch). Everything it
writes is fenced by that lease (a frozen-then-thawed worker writes nothing), and everything it
keeps on disk lives in its own folder ``work/<job>/<worker>-<epoch>/`` (clean-up never touches
another attempt's files, even on a data dir shared by several workers).

Riding out outages: the engine's ranks never wait for the database or storage. Records from the
engine go into an outbox; the outbox is pumped between polls of the run, and a write that fails
(database restarting, storage unreachable) stays queued and is retried with backoff. The lease is
renewed from its own thread, which knows when the last renewal succeeded: only when the lease
would run out does the attempt stop (ranks ended, nothing more written). A short outage therefore
costs nothing, not even an attempt.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shared.config import Settings
from shared.db import session_scope
from shared.errors import InvalidInput
from shared.models import File, Job, utcnow
from shared.routing import node_ranks
from shared.services import gangs, runs, webhooks
from shared.services.fleet import locate_base_model
from shared.services.gangs import GangPlan
from shared.services.init_adapters import find_adapter
from shared.services.logs import logs_prefix
from shared.services.runs import Lease, LeaseLost
from shared.spec import JobSpec
from shared.storage import Storage, storage_from_url
from worker import fleet
from worker.adapter_files import AdapterError, download_adapter, folder_digest, make_adapter_tarball
from worker.host_memory import oom_kills
from worker.training import events
from worker.training.checkpoints import CheckpointPolicy
from worker.training.failures import Failure, FailureClass, classify, read_log
from worker.training.launch import EXIT_PREEMPTED, Rendezvous, device_count
from worker.training.run import MemoryGuard, Outcome, RunResult, StopRequest, TrainingRun

log = logging.getLogger("lorafleet.runner")

LOG_KEEP_BYTES = 1024 * 1024  # per rank: the end of a log is what explains a failure
DISK_FULL_BYTES = 16 * 1024 * 1024  # less free than this under the work dir: "disk full"
T = TypeVar("T")


def checkpoint_prefix(lease: Lease, step: int) -> str:
    """Storage prefix of a checkpoint: the attempt's epoch is part of it, so a late upload of
    an older attempt can never overwrite (or be mistaken for) the live attempt's checkpoint."""
    return f"jobs/{lease.job_id}/checkpoints/step_{step}-e{lease.epoch}/"


def adapter_key(job_id: str) -> str:
    return f"jobs/{job_id}/adapter.tar.gz"


def attempt_dir(data_dir: Path, lease: Lease) -> Path:
    """``work/<job>/<worker>-<epoch>``: this attempt's own files and nothing else."""
    worker = re.sub(r"[^A-Za-z0-9_.-]", "_", lease.worker_id)
    return data_dir.resolve() / "work" / lease.job_id / f"{worker}-{lease.epoch}"


def job_cache_dir(data_dir: Path, job_id: str) -> Path:
    """``cache/<job>``: data prepared once per job (tokenised, packed), reused by every attempt
    on this host and shared by its ranks; removed when an attempt here ends the job."""
    return data_dir.resolve() / "cache" / job_id


class LeaseKeeper(threading.Thread):
    """Renews the lease from its own thread and knows when the last renewal succeeded.

    A slow step of the runner (a first torch import, a big upload) never lets the lease lapse
    while the worker lives; a database outage does not either, as long as it is shorter than
    what is left of the lease. ``lost``: the job is no longer ours (renewal refused) or the lease
    ran out while the database was unreachable; either way the attempt must stop writing.
    """

    def __init__(self, lease: Lease, settings: Settings) -> None:
        super().__init__(name=f"lease-{lease.job_id}", daemon=True)
        self.lease = lease
        self.lease_seconds = settings.lease_seconds
        self.period = max(0.2, min(2.0, settings.lease_seconds / 4))
        # Stop this long before the lease would expire, so the reaper never sees a live writer.
        self.margin = max(0.5, 0.2 * settings.lease_seconds)
        self.last_renewed = time.monotonic()  # the claim just set the lease
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.failures = 0
        self._stop = threading.Event()

    @property
    def deadline(self) -> float:
        """Monotonic time after which this attempt may no longer assume it holds the lease."""
        return self.last_renewed + self.lease_seconds - self.margin

    def expired(self) -> bool:
        return self.lost.is_set() or time.monotonic() > self.deadline

    def run(self) -> None:
        while not self._stop.wait(self.period):
            started = time.monotonic()
            try:
                with session_scope() as session:
                    ours = runs.renew_lease(session, self.lease, self.lease_seconds)
                    cancel = runs.cancel_requested(session, self.lease.job_id) if ours else False
            except Exception as exc:  # the database is unreachable: keep trying while we may
                self.failures += 1
                log.warning("lease renewal of %s failed (%s)", self.lease.job_id, exc)
                if time.monotonic() > self.deadline:
                    log.error("lease of %s ran out during an outage; stopping", self.lease.job_id)
                    self.lost.set()
                    return
                continue
            if not ours:
                self.lost.set()
                return
            self.last_renewed = started
            if cancel:
                self.cancelled.set()

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Upload:
    step: int
    path: Path
    state: dict[str, Any]
    prefix: str = ""
    digest: str = ""
    uploaded: bool = False


@dataclass
class Outbox:
    """Writes of an attempt, in order, retried with backoff until they land or the lease ends.

    Progress snapshots coalesce (only the newest matters); metric points, events and checkpoint
    commits are kept in order. Nothing here raises into the training loop.
    """

    lease: Lease
    storage: Storage
    keep: int
    events: list[tuple[str, str, dict[str, Any] | None, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    strategy: str | None = None  # the run's, once it started (events.Started)
    uploads: list[_Upload] = field(default_factory=list)
    lost: bool = False
    retry_at: float = 0.0
    backoff: float = 0.0
    outage_started: float | None = None
    outages: list[float] = field(default_factory=list)

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.events.append((level, message, data, utcnow()))

    @property
    def empty(self) -> bool:
        return not (self.events or self.metrics or self.progress or self.strategy or self.uploads)

    def pump(self, force: bool = False) -> bool:
        """Try the queued writes once (respecting backoff unless ``force``); True when empty."""
        if self.lost or self.empty:
            return not self.lost
        if not force and time.monotonic() < self.retry_at:
            return False
        try:
            self._write_all()
        except LeaseLost:
            log.warning("job %s: lease lost; dropping unwritten records", self.lease.job_id)
            self.lost = True
            self.discard()
            return False
        except Exception as exc:  # database or storage unreachable: keep it for later
            if self.outage_started is None:
                self.outage_started = time.monotonic()
            self.backoff = min(2.0, max(0.2, self.backoff * 2))
            self.retry_at = time.monotonic() + self.backoff
            log.warning(
                "job %s: write failed, retrying in %.1fs (%s)",
                self.lease.job_id,
                self.backoff,
                str(exc).splitlines()[0][:200],
            )
            return False
        if self.outage_started is not None:
            lasted = time.monotonic() - self.outage_started
            self.outages.append(lasted)
            self.outage_started = None
            self.event(
                f"database or storage unreachable for {lasted:.1f}s; training went on and the "
                "delayed records were written",
                "warning",
                {"outage_seconds": round(lasted, 1)},
            )
        self.backoff = 0.0
        return True

    def discard(self) -> None:
        """The lease is gone: remove what this attempt put in storage but never committed (an
        upload that failed half-way, or finished after a freeze). The prefixes carry the
        attempt's epoch, so nothing of the live attempt can be among them."""
        for upload in self.uploads:
            if upload.prefix:
                _delete_prefix(self.storage, upload.prefix)
        self.uploads.clear()

    def _write_all(self) -> None:
        while self.events:
            level, message, data, at = self.events[0]
            with session_scope() as session:
                runs.add_event(session, self.lease, level, message, data, created_at=at)
            self.events.pop(0)
        if self.strategy is not None:
            with session_scope() as session:
                runs.record_strategy(session, self.lease, self.strategy)
            self.strategy = None
        if self.metrics:
            with session_scope() as session:
                runs.add_metrics(session, self.lease, self.metrics)
            self.metrics = []
        if self.progress is not None:
            with session_scope() as session:
                runs.record_progress(session, self.lease, self.progress)
            self.progress = None
        while self.uploads:
            self._commit_checkpoint(self.uploads[0])
            self.uploads.pop(0)

    def _commit_checkpoint(self, upload: _Upload) -> None:
        if not upload.uploaded:
            if not upload.path.is_dir():  # pruned by the engine before we got to it
                return
            upload.prefix = checkpoint_prefix(self.lease, upload.step)
            upload.digest = folder_digest(upload.path)
            for item in sorted(upload.path.iterdir()):
                self.storage.put_file(upload.prefix + item.name, item)
            upload.uploaded = True
        # The fenced row is the commit point: without it the objects are never used.
        try:
            with session_scope() as session:
                runs.record_checkpoint(
                    session, self.lease, upload.step, upload.prefix, upload.digest, upload.state
                )
                old = runs.prune_checkpoints(session, self.lease, self.keep)
        except LeaseLost:
            _delete_prefix(self.storage, upload.prefix)  # ours alone: nobody will use them
            raise
        for old_prefix in old:
            _delete_prefix(self.storage, old_prefix)
        self.event(f"checkpoint saved at step {upload.step}", data={"step": upload.step})


def _delete_prefix(storage: Storage, prefix: str) -> None:
    try:
        for key in storage.list(prefix):
            storage.delete(key)
    except Exception:
        log.warning("could not delete %s from storage", prefix, exc_info=True)


class JobRunner:
    """One attempt of one job on this worker; with ``gang``, this worker's node of a multi-node
    attempt (``shared.services.gangs``).

    Every node fetches the inputs and the checkpoint and runs its ranks of the one world. Node 0
    holds the job (its global rank 0 reports progress, saves checkpoints and the adapter) and sets
    the outcome as a 1-node job's worker does. The other nodes decide nothing about the job: they
    train, keep their seat's lease, stop when it is lost or a cancel comes, and hand the gang back
    only when their own worker drains.
    """

    def __init__(
        self, lease: Lease, attempt: int, settings: Settings, gang: GangPlan | None = None
    ) -> None:
        self.lease = lease
        self.gang = gang
        self.job_id = lease.job_id
        self.worker_id = lease.worker_id
        self.attempt = attempt
        self.settings = settings
        self.storage: Storage = storage_from_url(
            settings.storage_url or "", settings.s3_endpoint_url
        )
        self.policy = CheckpointPolicy.with_keep(settings.checkpoints_keep)
        self.work = attempt_dir(settings.data_dir, lease)
        self.keeper = LeaseKeeper(lease, settings)
        self.outbox = Outbox(lease, self.storage, self.policy.keep)
        self._last_progress_write = 0.0
        self.guard: MemoryGuard | None = None
        self._oom_kills_before: int | None = None

    # ------------------------------------------------------------------ retrying
    def _retry(self, what: str, action: Callable[[], T]) -> T | None:
        """Run ``action`` until it succeeds or the lease runs out (None then, or on LeaseLost)."""
        delay = 0.2
        while True:
            try:
                return action()
            except LeaseLost:
                return None
            except Exception as exc:
                if self.keeper.expired():
                    log.error(
                        "job %s: %s failed until the lease ran out: %s", self.job_id, what, exc
                    )
                    return None
                log.warning("job %s: %s failed, retrying (%s)", self.job_id, what, exc)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _settle(self) -> bool:
        """Flush the outbox before a final transition; False if the lease ended first."""
        while not self.outbox.pump(force=True):
            if self.outbox.lost or self.keeper.expired():
                return False
            time.sleep(max(0.2, self.outbox.backoff))
        return True

    def _finish(self, status: str, **fields: Any) -> bool:
        def finish() -> bool:
            with session_scope() as session:
                return runs.finish_job(session, self.lease, status, **fields)

        done = self._settle() and bool(self._retry("final state", finish))
        if done:  # only the attempt that set the final state announces it
            try:
                webhooks.notify_final(self.job_id, self.settings)
            except Exception:
                log.exception("webhook for %s failed", self.job_id)
        return done

    # ------------------------------------------------------------------ inputs
    def _fetch_init_adapter(self, spec: JobSpec) -> Path | None:
        """``training.init_adapter``: the parent's adapter (final or checkpoint) in a local
        folder, verified against the digest recorded when it was stored (the same download and
        check the inference server uses)."""
        reference = spec.training.init_adapter
        if reference is None:
            return None
        with session_scope() as session:
            owner = session.get(Job, self.job_id).owner  # type: ignore[union-attr]
            try:
                source = find_adapter(session, owner, reference).adapter
            except InvalidInput as exc:  # deleted (or gone) since the job was submitted
                raise InputError(exc.message) from None
        scratch = self.work / "inputs" / "init_adapter.download"
        folder = self.work / "inputs" / "init_adapter"
        for path in (scratch, folder):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        try:
            download_adapter(self.storage, source, folder, scratch)
        except AdapterError as exc:
            raise InputError(f"training.init_adapter {reference}: {exc}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return folder

    def _fetch_inputs(self, spec: JobSpec) -> tuple[JobSpec, str]:
        """Download dataset files; resolve the base model to a local folder or hub id."""
        inputs = self.work / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        local: dict[str, str | None] = {"training_file": None, "validation_file": None}
        for name in local:
            file_id = getattr(spec, name)
            if not file_id:
                continue
            with session_scope() as session:
                record = session.get(File, file_id)
                key = record.storage_key if record is not None else None
            if key is None:
                raise InputError(f"{name} {file_id} no longer exists")
            target = inputs / f"{name}.jsonl"
            self.storage.get_file(key, target)
            local[name] = str(target)
        try:
            where = locate_base_model(spec.base_model, self.settings)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if isinstance(where, str):
            from worker.training.hub import check_hub_model

            problem = check_hub_model(where)
            if problem is not None:
                raise InputError(problem)
        model_path = str(where.resolve()) if isinstance(where, Path) else where
        return spec.model_copy(update=local), model_path

    def _fetch_checkpoint(self) -> tuple[Path, int] | None:
        """The newest committed checkpoint whose digest verifies; older ones if it does not."""

        def committed() -> list[tuple[int, str, str | None]]:
            with session_scope() as session:
                return [
                    (r.step, r.storage_key, r.sha256)
                    for r in runs.committed_checkpoints(session, self.job_id)
                ]

        rows = self._retry("checkpoint list", committed) or []
        for index, (step, prefix, sha) in enumerate(rows):
            target = self.work / "resume" / f"step_{step}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            problem = None
            try:
                keys = self.storage.list(prefix)
                if not keys:
                    problem = "its files are missing from storage"
                for key in keys:
                    self.storage.get_file(key, target / key[len(prefix) :].lstrip("/"))
                if problem is None and folder_digest(target) != sha:
                    problem = "its sha256 does not match the one recorded at commit"
            except FileNotFoundError:
                problem = "its files are missing from storage"
            if problem is None:
                return target, step
            older = rows[index + 1][0] if index + 1 < len(rows) else None
            fallback = f"falling back to step {older}" if older is not None else "starting over"
            self.outbox.event(
                f"checkpoint at step {step} is unusable ({problem}); {fallback}",
                "warning",
                {"step": step, "fallback": older},
            )
        return None

    # ------------------------------------------------------------------ progress
    def _handle(self, record: events.Record) -> None:
        """Every engine record lands in the outbox; nothing here talks to the database."""
        box = self.outbox
        if isinstance(record, events.Event):
            box.event(record.message, record.level, record.data)
        elif isinstance(record, events.Resumed):
            box.event(
                f"resumed from step {record.step} (attempt {self.attempt})",
                data={"step": record.step},
            )
        elif isinstance(record, events.Started):
            box.strategy = record.strategy
        elif isinstance(record, events.Step):
            box.metrics.append(record.metric_point())
            box.progress = record.snapshot()
        elif isinstance(record, events.CheckpointSaved):
            box.uploads.append(_Upload(record.step, Path(record.path), record.state))

    def _control(self) -> StopRequest | None:
        now = time.monotonic()
        due = now - self._last_progress_write >= self.settings.progress_interval_seconds
        if due or self.outbox.uploads:
            self.outbox.pump()
            self._last_progress_write = now
        if self.keeper.expired() or self.outbox.lost:
            return StopRequest.LOST
        if self.keeper.cancelled.is_set():
            return StopRequest.CANCEL
        if fleet.draining.is_set():
            return StopRequest.DRAIN
        return None

    # ------------------------------------------------------------------ run
    def run(self) -> str:
        self.work.mkdir(parents=True, exist_ok=True)
        self.keeper.start()
        outcome = "lost"
        try:
            outcome = self._run()
            return outcome
        finally:
            if outcome in ("succeeded", "failed", "cancelled"):  # this attempt ended the job
                shutil.rmtree(job_cache_dir(self.settings.data_dir, self.job_id), True)
            self.keeper.stop()
            if self.gang is not None:
                self._retry("seat release", self._end_seat)
            shutil.rmtree(self.work, ignore_errors=True)  # our attempt's folder, nothing else
            try:
                self.work.parent.rmdir()  # the job's folder, only if no other attempt uses it
            except OSError:
                pass

    def _end_seat(self) -> bool:
        """Our node's run is over: the reaper must not take our silence for a lost member."""
        with session_scope() as session:
            gangs.end_run(session, self.job_id, self.lease.epoch, self.worker_id)
        return True

    def _run(self) -> str:
        def read_spec() -> JobSpec:
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                assert job is not None
                return JobSpec.model_validate(job.spec)

        spec = self._retry("job read", read_spec)
        if spec is None:  # the database stayed away for the whole lease
            return "lost"
        try:
            local_spec, model_path = self._fetch_inputs(spec)
            init_adapter = self._fetch_init_adapter(spec)
        except InputError as exc:
            return self._fail(Failure("invalid_input", FailureClass.USER, str(exc)), None)
        except Exception as exc:  # storage or database trouble: another attempt may do better
            log.exception("could not fetch inputs of %s", self.job_id)
            return self._fail(
                Failure(
                    "input_unavailable", FailureClass.INFRASTRUCTURE, f"inputs unavailable: {exc}"
                ),
                None,
            )
        resume = self._fetch_checkpoint()
        gpus = device_count()
        gang = self.gang
        nproc = gang.local_ranks if gang else ranks_for(spec, gpus, self.settings.worker_procs)
        kind = "GPU" if gpus else "CPU"
        if gang is not None:
            first = gang.rank_offset
            self.outbox.event(
                f"node {gang.slot} of {gang.nodes} started on {self.worker_id} (attempt "
                f"{self.attempt}, {nproc} {kind} process(es): ranks {first}-{first + nproc - 1} "
                f"of {gang.world_size}; rendezvous {gang.master_addr}:{gang.master_port} id "
                f"{gang.run_id})",
                data={"node": gang.slot, "world_size": gang.world_size},
            )
        elif resume is None:
            self.outbox.event(
                f"started on {self.worker_id} (attempt {self.attempt}, {nproc} {kind} process(es))"
            )
        run = TrainingRun(
            spec=local_spec,
            model_path=model_path,
            work_dir=self.work,
            out_dir=self.work / "adapter",
            nproc=nproc,
            resume_from=resume[0] if resume else None,
            checkpoint_dir=self.work / "checkpoints",
            policy=self.policy,
            data_cache_dir=job_cache_dir(self.settings.data_dir, self.job_id),
            rendezvous=rendezvous_of(gang),
            init_adapter=init_adapter,
        )
        self.guard = MemoryGuard(memory_limit(self.settings))
        self._oom_kills_before = oom_kills()
        result = run.run(on_record=self._handle, control=self._control, watchdog=self.guard)
        return self._conclude(run, result)

    def _conclude(self, run: TrainingRun, result: RunResult) -> str:
        self._keep_logs(result)
        if result.outcome == Outcome.LOST or self.outbox.lost:
            log.warning("job %s is no longer ours; dropped", self.job_id)
            self.outbox.discard()
            return "lost"
        if not self.lease.leads:
            return self._conclude_member(result)
        if result.outcome == Outcome.CANCELLED:
            return "cancelled" if self._finish("cancelled") else "lost"
        if result.outcome == Outcome.SUCCEEDED:
            return self._succeed(run.out_dir, result)
        if result.outcome == Outcome.PREEMPTED:
            return self._release(result.last_step)
        failure = self._classify(result)
        return self._fail(failure, result)

    def _release(self, step: int | None) -> str:
        if not self._settle():  # the drain checkpoint must be committed before release
            return "lost"

        def release() -> str | None:
            with session_scope() as session:
                return runs.release_job(session, self.lease, step)

        status = self._retry("release", release)
        if status == "queued":
            self._publish()
        elif status == "cancelled":
            webhooks.notify_final(self.job_id, self.settings)
            return status
        return "released"

    def _conclude_member(self, result: RunResult) -> str:
        """How a gang node other than 0 ends: node 0 (or the reaper, when node 0 is gone) sets
        the job's outcome; this node only says why its own ranks failed, if they did."""
        assert self.gang is not None
        if result.exit_code == 0:
            self._settle()
            return "member done"
        if result.outcome == Outcome.CANCELLED:
            return "cancelled"
        if result.outcome == Outcome.PREEMPTED:
            if result.exit_code == EXIT_PREEMPTED:  # every rank checkpointed: node 0 releases
                return "released"
            # This worker drains before training started (its ranks report no steps): hand the
            # whole gang back now, no attempt spent; the others find their lease gone.
            return self._release(None)
        failure = self._classify(result)
        self.outbox.event(
            f"node {self.gang.slot} ({self.worker_id}) failed: {failure.message}",
            "warning",
            {"node": self.gang.slot, "code": failure.code},
        )
        self._settle()
        # Node 0 normally sees the same failure in its own ranks at once and decides (a user
        # error fails the job, anything else requeues the gang). If it has not within a lease,
        # its ranks may be waiting for ours at the rendezvous: decide here instead.
        deadline = time.monotonic() + self.settings.lease_seconds
        while time.monotonic() < deadline:
            if self.keeper.lost.is_set():  # the job moved on without us: done
                return "member failed"
            time.sleep(min(0.5, self.keeper.period))
        return self._fail(failure, result)

    def _classify(self, result: RunResult) -> Failure:
        rank = result.failed_rank if result.failed_rank is not None else 0
        text = read_log(result.log_files[rank]) if rank < len(result.log_files) else ""
        error = result.error
        if error is not None and error.code == "out_of_memory" and self.guard is not None:
            limit = self.guard.limit_bytes / 2**30
            peak = self.guard.peak_bytes / 2**30
            return Failure(
                "out_of_memory",
                FailureClass.USER,
                f"out of memory: the training processes used {peak:.1f} GiB, over this worker's "
                f"bound of {limit:.1f} GiB (LORAFLEET_WORKER_MEMORY_LIMIT_BYTES; POST /estimate "
                "shows what the job needs). Lower training.batch_size or "
                "training.max_seq_length, or enable training.gradient_checkpointing.",
            )
        if result.exit_code == -9 and self._oom_killer_struck():
            return Failure(
                "out_of_memory",
                FailureClass.USER,
                f"out of memory: the kernel's OOM killer ended rank {rank} (SIGKILL) while this "
                "job trained; POST /estimate shows what the job needs. Lower "
                "training.batch_size or training.max_seq_length, enable "
                "training.gradient_checkpointing, or bound the worker below the host's memory "
                "with LORAFLEET_WORKER_MEMORY_LIMIT_BYTES.",
            )
        free = shutil.disk_usage(self.work).free
        if free < DISK_FULL_BYTES:  # the rank could not even write why it failed
            return Failure(
                "disk_full",
                FailureClass.INFRASTRUCTURE,
                f"disk full: {free} bytes free under {self.work.parent} when rank {rank} failed "
                f"(exit status {result.exit_code})",
            )
        offset = self.gang.rank_offset if self.gang else 0
        return classify(
            result.exit_code,
            error.code if error else None,
            error.message if error else None,
            result.failed_rank + offset if result.failed_rank is not None else None,
            text,
        )

    def _oom_killer_struck(self) -> bool:
        """The cgroup's OOM-kill count grew during this attempt (see ``host_memory.oom_kills``)."""
        before, after = self._oom_kills_before, oom_kills()
        return before is not None and after is not None and after > before

    def _fail(self, failure: Failure, result: RunResult | None) -> str:
        log.error("job %s attempt %s: %s", self.job_id, self.attempt, failure.message)
        if not failure.retryable:
            done = self._finish("failed", error_code=failure.code, error_message=failure.message)
            return "failed" if done else "lost"

        def retry() -> str | None:
            with session_scope() as session:
                return runs.retry_job(session, self.lease, failure.code, failure.message)

        if not self._settle():
            return "lost"
        status = self._retry("retry", retry)
        if status == "queued":
            self._publish()
            return "retrying"
        if status in ("failed", "cancelled"):
            webhooks.notify_final(self.job_id, self.settings)
            return status
        return "lost"

    def _publish(self) -> None:
        def publish() -> bool:
            fleet.wake(self.job_id)
            return True

        self._retry("publish", publish)

    def _put(self, key: str, path: Path) -> bool:
        return self._retry(f"upload of {key}", lambda: self.storage.put_file(key, path)) is not None

    def _put_bytes(self, key: str, blob: bytes) -> bool:
        def put() -> int:
            return self.storage.put_stream(key, io.BytesIO(blob))

        return self._retry(f"upload of {key}", put) is not None

    def _keep_logs(self, result: RunResult) -> None:
        """Each attempt's rank logs (their last LOG_KEEP_BYTES) go to storage, whatever the end."""
        prefix = logs_prefix(self.job_id, self.lease.epoch)
        offset = self.gang.rank_offset if self.gang else 0  # global ranks: one folder per attempt
        for local, path in enumerate(result.log_files):
            if not path.exists():
                continue
            text = read_log(path, LOG_KEEP_BYTES).encode()  # from memory: the disk may be full
            key = f"{prefix}rank{offset + local}.log"
            self._put_bytes(key, text)

    def _succeed(self, out_dir: Path, result: RunResult) -> str:
        tarball = self.work / "adapter.tar.gz"
        sha, size = make_adapter_tarball(out_dir, tarball)
        key = adapter_key(self.job_id)
        manifest = result.manifest or {}
        if not self._put(key, tarball):
            return "lost"
        done = self._finish(
            "succeeded",
            adapter_key=key,
            adapter_sha256=sha,
            adapter_bytes=size,
            manifest=manifest,
            trained_tokens=int(manifest.get("trained_tokens") or 0),
        )
        return "succeeded" if done else "lost"


class InputError(ValueError):
    """The job's inputs cannot be used (a user error: fail at once with this message)."""


def ranks_for(spec: JobSpec, gpus: int, cpu_procs: int) -> int:
    """How many ranks a job trains with on this worker (``resources.gpus``: see docs/operators)."""
    return node_ranks(spec.resources, gpus, cpu_procs)


def rendezvous_of(gang: GangPlan | None) -> Rendezvous | None:
    """The launch's view of a started gang (None: a 1-node job, its ranks are the world)."""
    if gang is None:
        return None
    return Rendezvous(
        master_addr=gang.master_addr,
        master_port=gang.master_port,
        world_size=gang.world_size,
        rank_offset=gang.rank_offset,
        node_rank=gang.slot,
        nnodes=gang.nodes,
        run_id=gang.run_id,
    )


def memory_limit(settings: Settings) -> int:
    """The bound on the ranks' resident memory: the setting, else 90% of what is free now."""
    if settings.worker_memory_limit_bytes:
        return settings.worker_memory_limit_bytes
    import psutil

    return int(psutil.virtual_memory().available * 0.9)
