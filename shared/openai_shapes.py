"""The OpenAI fine-tuning API's object shapes, mapped to and from lorafleet's native objects.

The `/v1` facade is a translation layer only: a request body becomes a ``JobSpec`` and goes
through the same ``shared.services`` as ``POST /jobs``; rows come back out in the shapes the stock
``openai`` SDK parses (see DESIGN.md, "Worth knowing"). Nothing here touches the database.

Translation rules worth knowing:
- ``hyperparameters`` (deprecated top level) and ``method.supervised.hyperparameters`` are both
  read; the method block wins when both are sent, like OpenAI. ``method: {"type": "dpo", "dpo":
  {"hyperparameters": {...}}}`` trains DPO: ``beta`` (``auto`` = 0.1) besides the three common
  knobs, and ``precompute_reference`` as an extra key.
- ``"auto"`` means lorafleet's default: 1 epoch, ``TrainingSettings``' batch size, multiplier 1.
- ``learning_rate = learning_rate_multiplier x 2e-4`` (the LoRA default peak rate).
- LoRA and other engine settings may ride along, as the SDK's ``extra_body`` sends them: whole
  ``lora`` / ``training`` / ``resources`` blocks at the top level, or flat extra keys inside
  ``hyperparameters`` (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, or any
  ``TrainingSettings`` field such as ``max_steps``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import InvalidInput
from shared.model_names import checkpoint_model_name
from shared.models import Checkpoint, Job, JobEvent, JobMetric
from shared.schemas import unix_seconds
from shared.spec import DPO_METRICS, JobSpec, LoraSettings, Method, TrainingSettings
from shared.states import RUNNING, SUCCEEDED

BASE_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 1

# Flat hyperparameter keys that configure the adapter, mapped to LoraSettings fields.
LORA_ALIASES = {
    "lora_r": "r",
    "r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "alpha": "alpha",
    "lora_dropout": "dropout",
    "dropout": "dropout",
    "target_modules": "target_modules",
    "lora_target_modules": "target_modules",
}
# Extra DPO hyperparameter keys that configure the method itself (``DpoSettings`` fields).
DPO_EXTRAS = ("precompute_reference",)
# Top-level extra keys passed straight to JobSpec (everything else unknown is refused).
PASSTHROUGH = ("lora", "training", "resources", "priority", "webhook_url", "max_attempts")

Auto = Literal["auto"]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------- requests
class HyperparametersIn(BaseModel):
    """OpenAI's supervised hyperparameters; extra keys carry LoRA / training settings."""

    model_config = ConfigDict(extra="allow")

    n_epochs: int | Auto | None = Field(None, description="Whole passes over the data; `auto` = 1.")
    batch_size: int | Auto | None = Field(
        None, description="Sequences per device per step; `auto` = the service default."
    )
    learning_rate_multiplier: float | Auto | None = Field(
        None, description="Multiplier of the 2e-4 base rate; `auto` = 1."
    )


class SupervisedIn(BaseModel):
    """``method.supervised``."""

    model_config = ConfigDict(extra="allow")

    hyperparameters: HyperparametersIn | None = Field(None, description="Training knobs.")


class DpoHyperparametersIn(HyperparametersIn):
    """OpenAI's DPO hyperparameters: the supervised ones plus ``beta``."""

    beta: float | Auto | None = Field(
        None, description="DPO's beta (pull towards the reference); `auto` = 0.1."
    )


class DpoIn(BaseModel):
    """``method.dpo``."""

    model_config = ConfigDict(extra="allow")

    hyperparameters: DpoHyperparametersIn | None = Field(None, description="Training knobs.")


class MethodIn(BaseModel):
    """``method``: `supervised` or `dpo` LoRA training (`reinforcement` is refused)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["supervised", "dpo", "reinforcement"] = Field(description="Training method.")
    supervised: SupervisedIn | None = Field(None, description="Supervised settings.")
    dpo: DpoIn | None = Field(None, description="DPO settings.")


class FineTuningJobCreate(BaseModel):
    """Body of ``POST /v1/fine_tuning/jobs`` as the openai SDK sends it (plus ``extra_body``)."""

    model_config = ConfigDict(
        extra="allow",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-llama",
                    "training_file": "file-0123456789abcdef01234567",
                    "suffix": "support-bot",
                    "method": {
                        "type": "supervised",
                        "supervised": {"hyperparameters": {"n_epochs": 1, "lora_r": 8}},
                    },
                }
            ]
        },
    )

    model: str = Field(min_length=1, max_length=200, description="Base model (folder or hub id).")
    training_file: str = Field(min_length=1, max_length=64, description="Training file id.")
    validation_file: str | None = Field(None, max_length=64, description="Validation file id.")
    hyperparameters: HyperparametersIn | None = Field(None, description="Deprecated location.")
    method: MethodIn | None = Field(None, description="Training method and its hyperparameters.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Seeds data order and init.")
    suffix: str | None = Field(None, max_length=64, description="Label for the model name.")
    integrations: list[dict[str, Any]] | None = Field(None, description="Not supported; [] only.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")


def _set_auto(target: dict[str, Any], key: str, value: Any, default: Any) -> None:
    """An explicit value wins; `auto`/absent keeps what extra blocks set, else the default."""
    if value is not None and value != "auto":
        target[key] = value
    elif default is not None:
        target.setdefault(key, default)


def spec_from_openai(body: FineTuningJobCreate) -> JobSpec:
    """Translate an OpenAI job body into the native ``JobSpec``; InvalidInput names the field."""
    if body.method is not None and body.method.type not in ("supervised", "dpo"):
        raise InvalidInput(
            f"method.type {body.method.type!r} is not supported; lorafleet trains 'supervised' "
            "and 'dpo' LoRA adapters",
            param="method.type",
        )
    if body.integrations:
        raise InvalidInput("integrations are not supported; send []", param="integrations")
    extras = dict(body.model_extra or {})
    unknown = sorted(set(extras) - set(PASSTHROUGH))
    if unknown:
        raise InvalidInput(
            f"unknown field {unknown[0]!r}; extra fields may be {', '.join(PASSTHROUGH)}",
            param=unknown[0],
        )
    raw: dict[str, Any] = {k: v for k, v in extras.items() if v is not None}
    lora: dict[str, Any] = dict(raw.pop("lora", None) or {})
    training: dict[str, Any] = dict(raw.pop("training", None) or {})

    hp: HyperparametersIn | None = body.hyperparameters
    where = "hyperparameters"
    method: dict[str, Any] = {"type": "supervised"}
    if body.method is not None and body.method.type == "dpo":
        dpo: dict[str, Any] = {}
        method = {"type": "dpo", "dpo": dpo}
        block = body.method.dpo.hyperparameters if body.method.dpo is not None else None
        if block is not None:
            hp, where = block, "method.dpo.hyperparameters"
            if block.beta is not None:
                dpo["beta"] = block.beta
    else:
        supervised = body.method.supervised if body.method is not None else None
        if supervised is not None and supervised.hyperparameters is not None:
            hp = supervised.hyperparameters
            where = "method.supervised.hyperparameters"
    hp = hp or HyperparametersIn()
    for key, value in (hp.model_extra or {}).items():
        if key in LORA_ALIASES:
            lora[LORA_ALIASES[key]] = value
        elif key in TrainingSettings.model_fields:
            training[key] = value
        elif key in DPO_EXTRAS and "dpo" in method:
            method["dpo"][key] = value
        else:
            raise InvalidInput(
                f"unknown hyperparameter {key!r}: use n_epochs, batch_size, "
                "learning_rate_multiplier, lora_r, lora_alpha, lora_dropout, target_modules or a "
                "training setting (e.g. max_steps)"
                + (", beta or precompute_reference" if "dpo" in method else ""),
                param=f"{where}.{key}",
            )
    _set_auto(training, "epochs", hp.n_epochs, DEFAULT_EPOCHS)
    _set_auto(training, "batch_size", hp.batch_size, None)
    multiplier = hp.learning_rate_multiplier
    if multiplier is not None and multiplier != "auto":
        if not isinstance(multiplier, int | float) or multiplier <= 0:
            raise InvalidInput(
                "learning_rate_multiplier must be > 0", param=f"{where}.learning_rate_multiplier"
            )
        training["learning_rate"] = float(multiplier) * BASE_LEARNING_RATE
    if body.seed is not None:
        training["seed"] = body.seed

    native = {
        "base_model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix,
        "method": method,
        "lora": lora,
        "training": training,
        **raw,
    }
    try:
        return JobSpec.model_validate(native)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or "body"
        if param == "base_model":
            param = "model"
        elif param.startswith("method.dpo."):
            param = "method.dpo.hyperparameters." + param.removeprefix("method.dpo.")
        raise InvalidInput(f"{param}: {first.get('msg')}", param=param) from None


# --------------------------------------------------------------------------------------- responses
class OpenAIError(BaseModel):
    """A failed job's reason."""

    code: str = Field(description="Machine-readable reason.")
    message: str = Field(description="What went wrong.")
    param: str | None = Field(None, description="The field at fault, if any.")


class Hyperparameters(BaseModel):
    """The hyperparameters a job runs with (resolved: no `auto` left)."""

    n_epochs: int | Auto = Field(description="Whole passes over the data.")
    batch_size: int | Auto = Field(description="Sequences per device per micro-step.")
    learning_rate_multiplier: float | Auto = Field(description="Peak learning rate / 2e-4.")


class SupervisedOut(BaseModel):
    """``method.supervised``."""

    hyperparameters: Hyperparameters = Field(description="Resolved hyperparameters.")


class DpoHyperparameters(Hyperparameters):
    """The DPO hyperparameters a job runs with (resolved)."""

    beta: float = Field(description="DPO's beta.")


class DpoOut(BaseModel):
    """``method.dpo``."""

    hyperparameters: DpoHyperparameters = Field(description="Resolved hyperparameters.")


class MethodOut(BaseModel):
    """The training method: supervised or DPO, each with its resolved hyperparameters."""

    type: Literal["supervised", "dpo"] = Field(
        default="supervised", description="`supervised` or `dpo`."
    )
    supervised: SupervisedOut | None = Field(None, description="Supervised settings.")
    dpo: DpoOut | None = Field(None, description="DPO settings.")


class FineTuningJob(BaseModel):
    """OpenAI's ``fine_tuning.job``, plus lorafleet's ``lora``/``training`` as extra keys."""

    id: str = Field(description="Job id (the same id as the native API).")
    object: Literal["fine_tuning.job"] = Field(default="fine_tuning.job", description="Type tag.")
    created_at: int = Field(description="Unix seconds.")
    finished_at: int | None = Field(None, description="Unix seconds, once final.")
    error: OpenAIError | None = Field(None, description="Set when failed.")
    fine_tuned_model: str | None = Field(
        None, description="`ft:<model>:<owner>:<suffix>:<job id>` once succeeded."
    )
    hyperparameters: Hyperparameters = Field(description="Resolved hyperparameters.")
    model: str = Field(description="Base model.")
    organization_id: str = Field(description="The owner of the API key.")
    result_files: list[str] = Field(default_factory=list, description="Always empty.")
    seed: int = Field(description="Training seed.")
    status: str = Field(description="validating_files, queued, running, succeeded, ...")
    trained_tokens: int | None = Field(None, description="Tokens trained on, once succeeded.")
    training_file: str = Field(description="Training file id.")
    validation_file: str | None = Field(None, description="Validation file id.")
    estimated_finish: int | None = Field(None, description="Unix seconds, while running.")
    integrations: list[dict[str, Any]] = Field(default_factory=list, description="Always [].")
    method: MethodOut = Field(description="Training method.")
    user_provided_suffix: str | None = Field(None, description="The `suffix` sent.")
    metadata: dict[str, str] | None = Field(None, description="Not stored; null.")
    lora: LoraSettings = Field(description="lorafleet: adapter shape.")
    training: TrainingSettings = Field(description="lorafleet: optimisation settings.")


class JobEventOut(BaseModel):
    """OpenAI's ``fine_tuning.job.event``: a history line (`message`) or a step (`metrics`)."""

    id: str = Field(description="`ftevent-N` (history) or `ftmetric-N` (step); the cursor.")
    object: Literal["fine_tuning.job.event"] = Field(default="fine_tuning.job.event")
    created_at: int = Field(description="Unix seconds.")
    level: Literal["info", "warn", "error"] = Field(description="Severity.")
    message: str = Field(description="What happened.")
    type: Literal["message", "metrics"] = Field(description="History line or training step.")
    data: dict[str, Any] = Field(default_factory=dict, description="Structured details.")


class CheckpointOut(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint``."""

    id: str = Field(description="`ftckpt-N`; the cursor.")
    object: Literal["fine_tuning.job.checkpoint"] = Field(default="fine_tuning.job.checkpoint")
    created_at: int = Field(description="Unix seconds.")
    fine_tuned_model_checkpoint: str = Field(
        description="`ft:<model>:<owner>:<suffix>:<job id>:ckpt-step-<N>`."
    )
    fine_tuning_job_id: str = Field(description="Its job.")
    metrics: dict[str, float | None] = Field(description="step, train_loss, valid_loss.")
    step_number: int = Field(description="Optimizer step.")


class FileOut(BaseModel):
    """OpenAI's ``file``, plus lorafleet's rows/format/sha256 (read from the row)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="File id.")
    object: Literal["file"] = Field(default="file")
    bytes: int = Field(description="Size in bytes.")
    created_at: int = Field(description="Unix seconds.")
    filename: str = Field(description="Name it was uploaded under.")
    purpose: str = Field(description="`fine-tune` or `validation`.")
    status: Literal["processed"] = Field(default="processed", description="Validated at upload.")
    status_details: str | None = Field(None, description="Always null.")
    expires_at: int | None = Field(None, description="Never expires: null.")
    rows: int = Field(description="lorafleet: examples in the file.")
    format: str = Field(description="lorafleet: chat, completion, alpaca, text or preference.")
    sha256: str = Field(description="lorafleet: SHA-256 of the bytes.")

    _unix = field_validator("created_at", mode="before")(unix_seconds)


class Deleted(BaseModel):
    """OpenAI's answer to a delete (``files.delete``, ``models.delete``)."""

    id: str = Field(description="What was deleted.")
    object: Literal["file", "model"] = Field(description="Its kind.")
    deleted: Literal[True] = Field(default=True, description="Always true.")


class Page(BaseModel, Generic[T]):
    """OpenAI's list envelope; the SDK pages with ``after=<last id>`` while ``has_more``."""

    object: Literal["list"] = Field(default="list")
    data: list[T] = Field(description="This page.")
    has_more: bool = Field(default=False, description="Whether another page follows.")


def unix(moment: datetime | None) -> int | None:
    """Unix seconds, as every OpenAI timestamp is."""
    return int(moment.timestamp()) if moment is not None else None


def hyperparameters_of(training: TrainingSettings) -> Hyperparameters:
    """The OpenAI view of the native training settings."""
    return Hyperparameters(
        n_epochs=training.epochs,
        batch_size=training.batch_size,
        learning_rate_multiplier=round(training.learning_rate / BASE_LEARNING_RATE, 10),
    )


def method_out(method: Method, hyper: Hyperparameters) -> MethodOut:
    """The OpenAI ``method`` block of a job."""
    if method.dpo is not None:
        resolved = DpoHyperparameters(**hyper.model_dump(), beta=method.dpo.beta)
        return MethodOut(type="dpo", dpo=DpoOut(hyperparameters=resolved))
    return MethodOut(supervised=SupervisedOut(hyperparameters=hyper))


def job_to_openai(job: Job) -> FineTuningJob:
    """A job row as ``fine_tuning.job``."""
    spec = job.spec or {}
    training = TrainingSettings.model_validate(spec.get("training") or {})
    hyper = hyperparameters_of(training)
    error = None
    if job.error_code or job.error_message:
        error = OpenAIError(
            code=job.error_code or "error", message=job.error_message or job.error_code or ""
        )
    estimated = None
    progress = job.progress or {}
    if job.status == RUNNING.value and progress.get("eta_seconds") is not None:
        stamp = progress.get("updated_at")
        base = datetime.fromisoformat(stamp) if stamp else job.updated_at
        estimated = unix(base + timedelta(seconds=float(progress["eta_seconds"])))
    succeeded = job.status == SUCCEEDED.value
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=unix(job.finished_at),
        error=error,
        fine_tuned_model=job.fine_tuned_model,
        hyperparameters=hyper,
        model=job.base_model,
        organization_id=job.owner,
        seed=training.seed,
        status=job.status,
        trained_tokens=job.trained_tokens if succeeded else None,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=estimated,
        method=method_out(Method.model_validate(spec.get("method") or {}), hyper),
        user_provided_suffix=spec.get("suffix"),
        lora=LoraSettings.model_validate(spec.get("lora") or {}),
        training=training,
    )


def event_to_openai(row: JobEvent) -> JobEventOut:
    """A native history line as a `message` event (``warning`` becomes OpenAI's ``warn``)."""
    level = {"warning": "warn", "error": "error"}.get(row.level, "info")
    return JobEventOut(
        id=f"ftevent-{row.id}",
        created_at=int(row.created_at.timestamp()),
        level=level,  # type: ignore[arg-type]
        message=row.message,
        type="message",
        data=dict(row.data or {}),
    )


def metric_to_openai(row: JobMetric, total_steps: int | None) -> JobEventOut:
    """A per-step metric point as a `metrics` event, worded like OpenAI's step events."""
    parts = [f"Step {row.step}" + (f"/{total_steps}" if total_steps else "")]
    if row.train_loss is not None:
        parts.append(f"training loss={row.train_loss:.4f}")
    if row.eval_loss is not None:
        parts.append(f"validation loss={row.eval_loss:.4f}")
    if row.reward_accuracy is not None:
        parts.append(f"reward accuracy={row.reward_accuracy:.4f}")
    if row.reward_margin is not None:
        parts.append(f"reward margin={row.reward_margin:.4f}")
    if row.eval_reward_accuracy is not None:
        parts.append(f"validation reward accuracy={row.eval_reward_accuracy:.4f}")
    data: dict[str, Any] = {
        "step": row.step,
        "total_steps": total_steps,
        "train_loss": row.train_loss,
        "valid_loss": row.eval_loss,
        "learning_rate": row.learning_rate,
    }
    # DPO's numbers where the job has them; validation ones named like valid_loss.
    for name in DPO_METRICS:
        if getattr(row, name) is not None:
            data[name] = getattr(row, name)
        if getattr(row, f"eval_{name}") is not None:
            data[f"valid_{name}"] = getattr(row, f"eval_{name}")
    return JobEventOut(
        id=f"ftmetric-{row.id}",
        created_at=int(row.created_at.timestamp()),
        level="info",
        message=", ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if parts[1:] else ""),
        type="metrics",
        data=data,
    )


def checkpoint_to_openai(row: Checkpoint, job: Job) -> CheckpointOut:
    """A checkpoint row as ``fine_tuning.job.checkpoint``."""
    metrics = row.metrics or {}
    return CheckpointOut(
        id=f"ftckpt-{row.id}",
        created_at=int(row.created_at.timestamp()),
        fine_tuned_model_checkpoint=checkpoint_model_name(
            job.base_model, job.owner, job.suffix, job.id, row.step
        ),
        fine_tuning_job_id=job.id,
        metrics={
            "step": float(row.step),
            "train_loss": metrics.get("train_loss"),
            "valid_loss": metrics.get("eval_loss"),
        },
        step_number=row.step,
    )
