"""Public response models of the HTTP API, built from database rows by ``from_row``.

Every field has a description (it lands in the OpenAPI page). Response shapes are the contract in
DESIGN.md; request bodies live in ``shared.spec``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.models import Checkpoint, File, Job, JobEvent, JobMetric
from shared.spec import LoraSettings, Resources, TrainingSettings
from shared.states import SUCCEEDED


class FileObject(BaseModel):
    """An uploaded, validated dataset."""

    id: str = Field(description="File id, `file-` + 24 hex digits.")
    object: Literal["file"] = Field(default="file", description="Always `file`.")
    filename: str = Field(description="Name the file was uploaded under.")
    bytes: int = Field(ge=0, description="Size in bytes.")
    rows: int = Field(ge=0, description="Non-blank JSONL lines (examples).")
    format: str = Field(description="Detected format: chat, completion, alpaca or text.")
    sha256: str = Field(description="SHA-256 of the file's bytes, hex.")
    purpose: str = Field(description="`fine-tune` or `validation`.")
    status: Literal["processed"] = Field(
        default="processed", description="Always `processed`: files are validated at upload."
    )
    created_at: int = Field(description="Upload time, Unix seconds.")

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            filename=row.filename,
            bytes=row.bytes,
            rows=row.rows,
            format=row.format,
            sha256=row.sha256,
            purpose=row.purpose,
            created_at=int(row.created_at.timestamp()),
        )


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[FileObject] = Field(description="Files, newest first.")
    has_more: bool = Field(default=False, description="Whether more files exist past this page.")


class Progress(BaseModel):
    """A running job's latest progress snapshot (null fields: not known yet)."""

    status: str = Field(description="Job status.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, ge=0, description="Fractional epoch reached.")
    train_loss: float | None = Field(
        default=None, description="Latest training loss (answer tokens)."
    )
    eval_loss: float | None = Field(default=None, description="Latest validation loss.")
    learning_rate: float | None = Field(default=None, ge=0, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        None, ge=0, description="Trained tokens per second, all processes together."
    )
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Estimated seconds to finish."
    )
    updated_at: datetime | None = Field(default=None, description="When this snapshot was written.")

    @classmethod
    def from_job(cls, job: Job) -> Progress:
        data = {k: v for k, v in (job.progress or {}).items() if k in cls.model_fields}
        data["status"] = job.status
        return cls.model_validate(data)


class ErrorInfo(BaseModel):
    """Why a job failed."""

    code: str = Field(description="Machine-readable reason, e.g. `max_attempts_exceeded`.")
    message: str = Field(description="What went wrong and, where known, what to change.")


class JobObject(BaseModel):
    """A fine-tuning job."""

    id: str = Field(description="Job id, `ftjob-` + 24 hex digits.")
    object: Literal["job"] = Field(default="job", description="Always `job`.")
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    started_at: datetime | None = Field(default=None, description="When a worker first started it.")
    finished_at: datetime | None = Field(default=None, description="When it reached a final state.")
    base_model: str = Field(description="Model folder name or hub id being adapted.")
    training_file: str = Field(description="Training file id.")
    validation_file: str | None = Field(default=None, description="Validation file id, if any.")
    suffix: str | None = Field(
        default=None, description="Label added to the fine-tuned model name."
    )
    lora: LoraSettings = Field(description="Adapter shape.")
    training: TrainingSettings = Field(description="Optimisation settings.")
    resources: Resources = Field(description="Where the job may run.")
    priority: int = Field(default=0, description="Higher runs first within a queue.")
    error: ErrorInfo | None = Field(default=None, description="Set when the job failed.")
    attempts: int = Field(ge=0, description="Times a worker started the job.")
    max_attempts: int = Field(ge=1, description="Attempts before a job that keeps dying fails.")
    cancel_requested: bool = Field(
        default=False, description="A cancel is pending for a running job."
    )
    trained_tokens: int | None = Field(
        default=None, ge=0, description="Tokens trained on (with loss)."
    )
    fine_tuned_model: str | None = Field(
        None, description="`<base_model>:ft-<id>` once the job succeeded."
    )
    adapter_sha256: str | None = Field(default=None, description="SHA-256 of the adapter .tar.gz.")
    progress: Progress | None = Field(default=None, description="Latest progress snapshot.")

    @classmethod
    def from_row(cls, job: Job) -> JobObject:
        spec = job.spec or {}
        error = None
        if job.error_code or job.error_message:
            error = ErrorInfo(
                code=job.error_code or "error", message=job.error_message or job.error_code or ""
            )
        succeeded = job.status == SUCCEEDED.value
        return cls(
            id=job.id,
            status=job.status,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            base_model=job.base_model,
            training_file=job.training_file,
            validation_file=job.validation_file,
            suffix=spec.get("suffix"),
            lora=LoraSettings.model_validate(spec.get("lora") or {}),
            training=TrainingSettings.model_validate(spec.get("training") or {}),
            resources=Resources.model_validate(spec.get("resources") or {}),
            priority=job.priority,
            error=error,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            trained_tokens=job.trained_tokens,
            fine_tuned_model=f"{job.base_model}:ft-{job.id}" if succeeded else None,
            adapter_sha256=job.adapter_sha256,
            progress=Progress.from_job(job) if job.progress else None,
        )


class JobList(BaseModel):
    """A page of jobs, newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[JobObject] = Field(description="Jobs, newest first.")
    has_more: bool = Field(description="Whether more jobs exist past this page.")


class Event(BaseModel):
    """One line of a job's history."""

    id: int = Field(ge=1, description="Increasing id; the cursor for polling and SSE.")
    object: Literal["job.event"] = Field(default="job.event", description="Always `job.event`.")
    created_at: datetime = Field(description="When it happened (UTC).")
    level: str = Field(description="info, warning or error.")
    message: str = Field(description="What happened.")
    data: dict[str, Any] | None = Field(default=None, description="Structured details, if any.")

    @classmethod
    def from_row(cls, row: JobEvent) -> Event:
        return cls(
            id=row.id,
            created_at=row.created_at,
            level=row.level,
            message=row.message,
            data=row.data,
        )


class EventList(BaseModel):
    """A job's events, oldest first."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[Event] = Field(description="Events, oldest first.")
    has_more: bool = Field(default=False, description="Whether more events exist past this page.")


class MetricPoint(BaseModel):
    """The training curve at one optimizer step."""

    step: int = Field(ge=0, description="Optimizer step.")
    train_loss: float | None = Field(default=None, description="Training loss at this step.")
    eval_loss: float | None = Field(default=None, description="Validation loss, on eval steps.")
    learning_rate: float | None = Field(default=None, ge=0, description="Learning rate used.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Throughput.")
    created_at: datetime = Field(description="When the point was recorded.")

    @classmethod
    def from_row(cls, row: JobMetric) -> MetricPoint:
        return cls(
            step=row.step,
            train_loss=row.train_loss,
            eval_loss=row.eval_loss,
            learning_rate=row.learning_rate,
            tokens_per_second=row.tokens_per_second,
            created_at=row.created_at,
        )


class MetricList(BaseModel):
    """The per-step series of a job."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[MetricPoint] = Field(description="Points by step.")


class CheckpointObject(BaseModel):
    """A saved checkpoint a retry can resume from."""

    id: int = Field(ge=1, description="Row id.")
    object: Literal["checkpoint"] = Field(default="checkpoint", description="Always `checkpoint`.")
    step: int = Field(ge=0, description="Optimizer step it was taken at.")
    sha256: str | None = Field(
        default=None, description="SHA-256 of the stored checkpoint archive."
    )
    metrics: dict[str, Any] | None = Field(default=None, description="Metrics at that step.")
    created_at: datetime = Field(description="When it was recorded.")

    @classmethod
    def from_row(cls, row: Checkpoint) -> CheckpointObject:
        return cls(
            id=row.id,
            step=row.step,
            sha256=row.sha256,
            metrics=row.metrics,
            created_at=row.created_at,
        )


class CheckpointList(BaseModel):
    """A job's checkpoints by step."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[CheckpointObject] = Field(description="Checkpoints by step.")


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: Any = Field(description="Human-readable message (FastAPI's conventional key).")
    error: dict[str, Any] = Field(description="`{code, message, param}` for programs.")


class AdapterUrl(BaseModel):
    """A time-limited direct download link for a job's adapter (S3/MinIO storage only)."""

    url: str = Field(description="Presigned GET URL of the adapter .tar.gz; no key needed.")
    expires_at: datetime = Field(description="When the URL stops working (UTC).")


class GpuDevice(BaseModel):
    """One GPU a worker owns, as of its last heartbeat."""

    index: int = Field(ge=0, description="Device index inside the worker.")
    uuid: str = Field(description="The GPU's UUID (no two live workers share one).")
    memory_used_bytes: int = Field(ge=0, description="Device memory in use, all processes.")
    memory_total_bytes: int = Field(ge=0, description="Device memory in total.")
    utilization_percent: float | None = Field(
        default=None, ge=0, le=100, description="GPU utilisation (NVML); null without NVML."
    )


class WorkerObject(BaseModel):
    """A registered worker as ``GET /workers`` shows it."""

    id: str = Field(description="The worker's Celery node name (unique per worker process).")
    hostname: str = Field(description="Host (or container) the worker runs on.")
    gpus: int = Field(ge=0, description="GPUs the worker trains on (0: a CPU worker).")
    gpu_type: str | None = Field(description="GPU model name, or the configured label.")
    gpu_memory_bytes: int | None = Field(description="Memory of one GPU; null on CPU workers.")
    procs: int = Field(ge=1, description="Training processes per job (GPUs, or CPU processes).")
    status: Literal["idle", "busy", "draining", "offline"] = Field(
        description="`offline` also when the last heartbeat is older than 3 leases."
    )
    current_job: str | None = Field(description="The job it is training, if any.")
    last_heartbeat: datetime = Field(description="When it last reported (UTC).")
    version: str | None = Field(description="lorafleet version the worker runs.")
    devices: list[GpuDevice] = Field(
        default_factory=list,
        description="Live use of each GPU it owns (empty on CPU workers and when offline).",
    )


class WorkerList(BaseModel):
    """All registered workers, most recently seen first."""

    data: list[WorkerObject] = Field(description="Workers.")
