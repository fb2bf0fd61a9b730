"""Public response models of the HTTP API, read from database rows with ``from_attributes``.

``Model.model_validate(row)`` reads the row's attributes by field name; what a row does not hold as
a column (a job's ``lora``, ``error`` or ``fine_tuned_model``) is a property of the ORM class in
``shared.models``, so there is no per-schema copying code. Every field has a description (it
lands in the OpenAPI page). Response shapes are the contract in DESIGN.md; request bodies live in
``shared.spec``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shared.spec import LoraSettings, Method, Resources, TrainingSettings

ROWS = ConfigDict(from_attributes=True)


def unix_seconds(value: Any) -> Any:
    """A datetime as Unix seconds (the OpenAI-style ``created_at`` of files); others unchanged."""
    return int(value.timestamp()) if isinstance(value, datetime) else value


class FileObject(BaseModel):
    """An uploaded, validated dataset."""

    model_config = ROWS

    id: str = Field(description="File id, `file-` + 24 hex digits.")
    object: Literal["file"] = Field(default="file", description="Always `file`.")
    filename: str = Field(description="Name the file was uploaded under.")
    bytes: int = Field(ge=0, description="Size in bytes.")
    rows: int = Field(ge=0, description="Non-blank JSONL lines (examples).")
    format: str = Field(
        description="Detected format: chat, completion, alpaca, text, or preference (DPO pairs)."
    )
    sha256: str = Field(description="SHA-256 of the file's bytes, hex.")
    purpose: str = Field(description="`fine-tune` or `validation`.")
    status: Literal["processed"] = Field(
        default="processed", description="Always `processed`: files are validated at upload."
    )
    created_at: int = Field(description="Upload time, Unix seconds.")

    _unix = field_validator("created_at", mode="before")(unix_seconds)


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[FileObject] = Field(description="Files, newest first.")
    has_more: bool = Field(default=False, description="Whether more files exist past this page.")


class Progress(BaseModel):
    """A running job's latest progress snapshot (null fields: not known yet)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "running",
                    "step": 12,
                    "total_steps": 40,
                    "epoch": 0.3,
                    "train_loss": 1.7321,
                    "eval_loss": None,
                    "learning_rate": 0.00019,
                    "tokens_per_second": 5210.4,
                    "eta_seconds": 93.0,
                    "updated_at": "2025-01-01T12:00:03Z",
                }
            ]
        }
    )

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
    rewards_chosen: float | None = Field(
        default=None, description="DPO: mean reward beta * (log p - log p_ref) of chosen answers."
    )
    rewards_rejected: float | None = Field(
        default=None, description="DPO: mean reward of the rejected answers."
    )
    reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="DPO: share of pairs whose chosen reward is higher."
    )
    reward_margin: float | None = Field(
        default=None, description="DPO: mean reward margin, chosen minus rejected."
    )
    eval_rewards_chosen: float | None = Field(
        default=None, description="DPO: rewards_chosen on the validation pairs."
    )
    eval_rewards_rejected: float | None = Field(
        default=None, description="DPO: rewards_rejected on the validation pairs."
    )
    eval_reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="DPO: reward_accuracy on the validation pairs."
    )
    eval_reward_margin: float | None = Field(
        default=None, description="DPO: reward_margin on the validation pairs."
    )
    updated_at: datetime | None = Field(default=None, description="When this snapshot was written.")

    @classmethod
    def of(cls, status: str, snapshot: dict[str, Any] | None) -> Progress:
        """The snapshot a worker stored (``Job.progress``) with the job's current status."""
        return cls.model_validate({**(snapshot or {}), "status": status})


class ErrorInfo(BaseModel):
    """Why a job failed."""

    code: str = Field(description="Machine-readable reason, e.g. `max_attempts_exceeded`.")
    message: str = Field(description="What went wrong and, where known, what to change.")


class JobObject(BaseModel):
    """A fine-tuning job."""

    model_config = ROWS

    id: str = Field(description="Job id, `ftjob-` + 24 hex digits.")
    object: Literal["job"] = Field(default="job", description="Always `job`.")
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    started_at: datetime | None = Field(default=None, description="When a worker first started it.")
    finished_at: datetime | None = Field(default=None, description="When it reached a final state.")
    base_model: str = Field(description="Model folder name or hub id being adapted.")
    deleted_at: datetime | None = Field(
        default=None,
        description="Set once the owner deleted the job: its adapter, checkpoints and logs are "
        "gone from storage; the record stays.",
    )
    training_file: str = Field(description="Training file id.")
    validation_file: str | None = Field(default=None, description="Validation file id, if any.")
    suffix: str | None = Field(
        default=None, description="Label added to the fine-tuned model name."
    )
    method: Method = Field(description="Training method: supervised or dpo (with its settings).")
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
    strategy: Literal["ddp", "fsdp"] | None = Field(
        default=None,
        description="The strategy the latest run trains with: what training.strategy (auto by "
        "default) resolved to on its worker's devices. Null until a run starts.",
    )
    fine_tuned_model: str | None = Field(
        None,
        description="`ft:<base>:<owner>:<suffix>:<job id>` once the job succeeded "
        "(shared.model_names; the job id at the end resolves it).",
    )
    adapter_sha256: str | None = Field(default=None, description="SHA-256 of the adapter .tar.gz.")
    progress: Progress | None = Field(default=None, description="Latest progress snapshot.")
    queue_position: int | None = Field(
        default=None,
        ge=1,
        description="While queued: 1 = the next job a free worker takes (priority, then "
        "fair share between owners, then age). Null once running or final.",
    )
    workers: list[str] = Field(
        default_factory=list,
        description="Ids of the workers training it, by node rank (resources.nodes > 1: the "
        "gang's members; node 0 hosts the rendezvous and reports progress). While a gang "
        "forms: the workers holding seats so far. Empty when no worker has it.",
    )

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_with_status(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, dict):
            return {**value, "status": info.data.get("status")}
        return value


class JobList(BaseModel):
    """A page of jobs, newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[JobObject] = Field(description="Jobs, newest first.")
    has_more: bool = Field(description="Whether more jobs exist past this page.")


class Event(BaseModel):
    """One line of a job's history."""

    model_config = ROWS

    id: int = Field(ge=1, description="Increasing id; the cursor for polling and SSE.")
    object: Literal["job.event"] = Field(default="job.event", description="Always `job.event`.")
    created_at: datetime = Field(description="When it happened (UTC).")
    level: str = Field(description="info, warning or error.")
    message: str = Field(description="What happened.")
    data: dict[str, Any] | None = Field(default=None, description="Structured details, if any.")


class EventList(BaseModel):
    """A job's events, oldest first."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[Event] = Field(description="Events, oldest first.")
    has_more: bool = Field(default=False, description="Whether more events exist past this page.")


class MetricPoint(BaseModel):
    """The training curve at one optimizer step."""

    model_config = ROWS

    step: int = Field(ge=0, description="Optimizer step.")
    train_loss: float | None = Field(default=None, description="Training loss at this step.")
    eval_loss: float | None = Field(default=None, description="Validation loss, on eval steps.")
    learning_rate: float | None = Field(default=None, ge=0, description="Learning rate used.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Throughput.")
    rewards_chosen: float | None = Field(default=None, description="DPO: chosen reward (mean).")
    rewards_rejected: float | None = Field(default=None, description="DPO: rejected reward.")
    reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="DPO: share of pairs ranked right."
    )
    reward_margin: float | None = Field(default=None, description="DPO: chosen - rejected reward.")
    eval_rewards_chosen: float | None = Field(
        default=None, description="DPO, validation pairs, on eval steps: chosen reward."
    )
    eval_rewards_rejected: float | None = Field(
        default=None, description="DPO, validation pairs, on eval steps: rejected reward."
    )
    eval_reward_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="DPO, validation pairs, on eval steps: accuracy."
    )
    eval_reward_margin: float | None = Field(
        default=None, description="DPO, validation pairs, on eval steps: reward margin."
    )
    created_at: datetime = Field(description="When the point was recorded.")


class MetricList(BaseModel):
    """The per-step series of a job."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[MetricPoint] = Field(description="Points by step.")


class CheckpointObject(BaseModel):
    """A saved checkpoint a retry can resume from."""

    model_config = ROWS

    id: int = Field(ge=1, description="Row id.")
    object: Literal["checkpoint"] = Field(default="checkpoint", description="Always `checkpoint`.")
    step: int = Field(ge=0, description="Optimizer step it was taken at.")
    sha256: str | None = Field(
        default=None, description="SHA-256 of the stored checkpoint archive."
    )
    metrics: dict[str, Any] | None = Field(default=None, description="Metrics at that step.")
    created_at: datetime = Field(description="When it was recorded.")


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

    model_config = ROWS

    id: str = Field(description="The worker's Celery node name (unique per worker process).")
    hostname: str = Field(description="Host (or container) the worker runs on.")
    gpus: int = Field(ge=0, description="GPUs the worker trains on (0: a CPU worker).")
    gpu_type: str | None = Field(description="GPU model name, or the configured label.")
    gpu_memory_bytes: int | None = Field(description="Memory of one GPU; null on CPU workers.")
    host_memory_bytes: int | None = Field(
        default=None, description="RAM of the worker's host or container (CPU training uses it)."
    )
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


class InferenceServerObject(BaseModel):
    """A registered ``lorafleet inference`` server as ``GET /workers`` shows it."""

    model_config = ROWS

    id: str = Field(description="The server's id (process and host).")
    url: str = Field(description="Where the API reaches it.")
    hostname: str = Field(description="Host (or container) it runs on.")
    device: str = Field(description="Device and dtype it computes in (`cpu float32`, ...).")
    base_models: list[str] = Field(default_factory=list, description="Base models it holds.")
    adapters: int = Field(ge=0, description="Adapters attached to them.")
    status: Literal["idle", "busy", "offline"] = Field(
        description="`offline` also when the last heartbeat is older than 3 leases."
    )
    last_heartbeat: datetime = Field(description="When it last reported (UTC).")
    version: str | None = Field(default=None, description="lorafleet version it runs.")


class WorkerList(BaseModel):
    """All registered workers, most recently seen first."""

    data: list[WorkerObject] = Field(description="Workers.")
    inference_servers: list[InferenceServerObject] = Field(
        default_factory=list, description="Inference servers (`lorafleet inference`)."
    )


class BaseModelObject(BaseModel):
    """A base model a job can name in ``base_model``."""

    model_config = ROWS

    id: str = Field(description="What to put in `base_model` (folder name, or hub id of a mirror).")
    object: Literal["base_model"] = Field(default="base_model", description="Always `base_model`.")
    parameters: int | None = Field(description="Parameter count (null: unreadable folder).")
    context_length: int | None = Field(
        description="max_position_embeddings: the largest training.max_seq_length it accepts."
    )
    chat_template: bool = Field(
        description="The tokenizer has a chat template (chat rows use it; otherwise "
        "`Role: content` blocks)."
    )
    model_type: str | None = Field(description="config.json model_type, e.g. llama, qwen2, gpt2.")
    dtype: str | None = Field(description="Dtype of most stored weights.")
    error: str | None = Field(default=None, description="Why the folder cannot be used, if so.")


class BaseModelList(BaseModel):
    """The base models of this server."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[BaseModelObject] = Field(description="Models by name.")
    allowed_hub_models: str = Field(
        description="Hub ids that may be named besides these (LORAFLEET_ALLOWED_HUB_MODELS: "
        "comma list or patterns; '*' any, '' none)."
    )


class KeyObject(BaseModel):
    """An API key's record; the secret itself is never shown again after creation."""

    model_config = ROWS

    id: str = Field(description="Key id, `key-` + 24 hex digits (not the secret).")
    object: Literal["api_key"] = Field(default="api_key", description="Always `api_key`.")
    owner: str = Field(description="Tenant the key acts as.")
    admin: bool = Field(description="May use fleet and key routes.")
    created_at: datetime = Field(description="When it was created (UTC).")
    revoked_at: datetime | None = Field(description="When it was revoked; null while live.")


class KeyList(BaseModel):
    """API keys, oldest first."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[KeyObject] = Field(description="Keys.")


class QueueEntry(BaseModel):
    """A queued job as the fleet view shows it (every owner's)."""

    model_config = ROWS

    position: int | None = Field(
        default=None, ge=1, description="Place in the dispatch order (1 = next)."
    )
    id: str = Field(description="Job id.")
    owner: str = Field(description="Who submitted it.")
    base_model: str = Field(description="Model being adapted.")
    priority: int = Field(description="Higher runs first.")
    gpus_required: int = Field(ge=0, description="GPUs it needs (0: any worker).")
    gpu_type: str | None = Field(default=None, description="GPU type it needs, if any.")
    created_at: datetime = Field(description="When it was submitted (UTC).")


class QueueList(BaseModel):
    """The queue, in dispatch order."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[QueueEntry] = Field(description="Queued jobs, next first.")
