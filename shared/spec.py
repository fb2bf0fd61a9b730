"""The job body: what to train. One schema for `POST /jobs`, `POST /estimate` and `lorafleet train`.

Validation lives here so the API refuses a bad job before it is queued and the engine can trust
what it gets. Every field carries a description and a range; cross-field rules name the field.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
# The suffix becomes part of a colon-separated model name (shared.model_names): no colons.
SUFFIX_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_NODES = 64  # workers one job may span (resources.nodes)


class LoraSettings(BaseModel):
    """LoRA adapter shape (peft ``LoraConfig``)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, le=4096, description="Scaling numerator: update * alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module name suffixes to adapt (e.g. q_proj, v_proj; c_attn for GPT-2), "
        "or 'all-linear'. Checked against the model before the job is queued. Omitted or "
        "null: the model's attention projections (q_proj+v_proj for Llama, Qwen2, Mistral...; "
        "c_attn for GPT-2; query_key_value for GPT-NeoX/Falcon; qkv_proj for Phi-3), or every "
        "linear layer when it has none of these; the job object shows what was chosen.",
    )

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, value: list[str] | str | None) -> list[str] | str | None:
        if value is None or isinstance(value, str):
            return value
        if not value:
            raise ValueError("target_modules must name at least one module")
        if len(value) > 64:
            raise ValueError("target_modules may name at most 64 modules")
        for name in value:
            if not _MODULE_NAME.match(name) or len(name) > 128:
                raise ValueError(f"target_modules: {name!r} is not a module name")
        return sorted(set(value), key=value.index)


class TrainingSettings(BaseModel):
    """Optimisation settings. ``max_steps`` wins over ``epochs`` when both are set."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1, le=1000, description="Whole passes over the data.")
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Optimizer steps; wins over epochs when set."
    )
    batch_size: int = Field(
        4,
        ge=1,
        le=4096,
        description="Sequences per device per micro-step (a packed row holds several examples).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-steps per optimizer step."
    )
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description="Share of steps warming up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    max_seq_length: int = Field(
        512, ge=8, le=131072, description="Tokens per sequence; longer examples are truncated."
    )
    packing: bool = Field(
        True, description="Pack several examples per row (no cross-example attention)."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU."
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How the job's processes share the model. ddp: each holds a whole replica "
        "(fastest when it fits one device). fsdp: FSDP2 shards the frozen base, adapters and "
        "optimizer state over the processes, for a base model too large for one device (slower: "
        "every micro-step re-gathers the base). auto: ddp when POST /estimate says a replica "
        "fits one device, else fsdp. One process always trains as ddp (nothing to shard).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds data order, init and dropout.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Checkpoint interval in steps; null = the service default."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Eval interval on validation_file; eval also runs at the end."
    )
    init_adapter: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Start from an earlier adapter instead of a fresh LoRA (SFT then DPO, or "
        "more training): a succeeded job id of yours (`ftjob-...`), its `fine_tuned_model`, or "
        "a committed checkpoint name of any job of yours (`...:ckpt-step-N`); with `lorafleet "
        "train`, a local "
        "adapter folder. Its lora r, alpha and target_modules must equal this job's; the "
        "manifest records the parent and its adapter's sha256. A DPO job's reference is then "
        "this starting adapter (base + it), precomputed before the first update for the "
        "training and validation pairs and kept with the checkpoints.",
    )


DEFAULT_BETA = 0.1
# DPO's own numbers, reported per step (means over the step's pairs) and per evaluation (over the
# validation pairs, ``eval_`` prefixed): the rewards beta * (log p_policy - log p_reference) of
# the chosen and of the rejected answers, the share of pairs whose chosen reward is the higher,
# and the mean margin chosen - rejected. One list for the engine's records, the database's
# metric columns and the API's schemas.
DPO_METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
EVAL_DPO_METRICS = tuple(f"eval_{name}" for name in DPO_METRICS)


class DpoSettings(BaseModel):
    """Direct preference optimisation (DPO, sigmoid loss) on preference pairs."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        DEFAULT_BETA,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference (the base model without the "
        "adapter, or the starting adapter of training.init_adapter): higher stays closer. "
        "`auto` = 0.1.",
    )
    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probabilities once before training instead of a "
        "forward with the adapter off at every step (saves that forward; kept with the "
        "checkpoints, so a resumed job uses the same values). With training.init_adapter the "
        "reference (the starting adapter) is always precomputed.",
    )

    @field_validator("beta", mode="before")
    @classmethod
    def _auto_beta(cls, value: Any) -> Any:
        return DEFAULT_BETA if value == "auto" else value


class Method(BaseModel):
    """How the adapter is trained: supervised (next-token loss on the answers) or DPO."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"] = Field(
        "supervised",
        description="`supervised` (files of chat, completion, alpaca or text rows) or `dpo` "
        "(files of preference pairs).",
    )
    dpo: DpoSettings | None = Field(
        None, description="DPO settings (type `dpo` only; defaults when left out)."
    )

    @model_validator(mode="after")
    def _settings_of_type(self) -> Method:
        if self.type == "dpo" and self.dpo is None:
            self.dpo = DpoSettings()
        if self.type != "dpo" and self.dpo is not None:
            raise ValueError(f"method.dpo is set but method.type is {self.type!r}; use 'dpo'")
        return self

    @property
    def is_dpo(self) -> bool:
        return self.type == "dpo"


class Resources(BaseModel):
    """Where the job may run."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | Literal["all"] = Field(
        "all",
        description="GPUs for the job: a count N > 0 (workers with at least N GPUs, trains on "
        "N), or 'all' / 0 (any worker, CPU included; trains on every device it owns).",
    )
    gpu_type: str | None = Field(
        None, max_length=64, description="Only workers whose GPU type contains this string."
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Workers the job trains on at once, as one world (a gang, torch's "
        "rendezvous): each contributes gpus_per_node ranks (a CPU worker LORAFLEET_WORKER_PROCS). "
        "A `gpus` count larger than any one worker is split into nodes at submit.",
    )
    gpus_per_node: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="GPUs each node trains on (a worker needs at least this many); null: "
        "gpus / nodes when gpus is a count, else every GPU of each worker.",
    )

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 1024:
            raise ValueError("gpus must be between 0 and 1024 or 'all'")
        return value

    @model_validator(mode="after")
    def _check_split(self) -> Resources:
        gpus, nodes, per_node = self.gpus, self.nodes, self.gpus_per_node
        if gpus == 0 and per_node is not None:
            raise ValueError(
                "resources.gpus 0 (any worker, CPU included) contradicts "
                f"resources.gpus_per_node {per_node}; leave gpus out or set it to 'all'"
            )
        if isinstance(gpus, int) and gpus > 0:
            if per_node is not None and gpus != nodes * per_node:
                raise ValueError(
                    f"resources.gpus {gpus} must equal resources.nodes {nodes} x "
                    f"resources.gpus_per_node {per_node} (or leave resources.gpus out)"
                )
            if per_node is None and gpus % nodes:
                raise ValueError(
                    f"resources.gpus {gpus} cannot be split evenly over resources.nodes "
                    f"{nodes}; set resources.gpus_per_node"
                )
        return self

    @property
    def node_gpus(self) -> int:
        """GPUs one node needs (and trains on); 0: any worker, every device it has."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return self.gpus // self.nodes if isinstance(self.gpus, int) else 0


JOB_EXAMPLE: dict[str, Any] = {
    "base_model": "tiny-llama",
    "training_file": "file-0123456789abcdef01234567",
    "validation_file": None,
    "suffix": "support-bot",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "training": {
        "epochs": 1,
        "max_steps": 20,
        "batch_size": 4,
        "learning_rate": 0.0002,
        "max_seq_length": 512,
        "seed": 0,
    },
    "resources": {"gpus": "all"},
}
ESTIMATE_EXAMPLE: dict[str, Any] = {**JOB_EXAMPLE, "training_file": None}
CLONE_EXAMPLE: dict[str, Any] = {"suffix": "lr-1e-4", "training": {"learning_rate": 0.0001}}


class JobSpec(BaseModel):
    """A fine-tuning job body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    base_model: str = Field(
        ...,
        min_length=1,
        max_length=200,
        description="A model folder name in LORAFLEET_MODELS_DIR, or an allowed hub id (org/name).",
    )
    training_file: str = Field(
        ..., min_length=1, max_length=4096, description="File id (service) or local path (CLI)."
    )
    validation_file: str | None = Field(
        None, max_length=4096, description="Optional file for eval loss."
    )
    suffix: str | None = Field(
        None,
        max_length=64,
        pattern=SUFFIX_PATTERN,
        description="Label in the fine-tuned model name `ft:<base>:<owner>:<suffix>:<job id>`: "
        "1 to 64 letters, digits, '.', '_' or '-'.",
        examples=["support-bot"],
    )
    method: Method = Field(
        default_factory=Method,  # type: ignore[arg-type]
        description='`{"type": "supervised"}` (default) or `{"type": "dpo", "dpo": {"beta": '
        "0.1}}` (OpenAI's shape); the training file's format must suit it.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)  # type: ignore[arg-type]
    training: TrainingSettings = Field(default_factory=TrainingSettings)  # type: ignore[arg-type]
    resources: Resources = Field(default_factory=Resources)  # type: ignore[arg-type]
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first within a queue.")
    webhook_url: str | None = Field(
        None, max_length=2048, description="POSTed the job (HMAC-signed) on a final state."
    )
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="Attempts before failing; default LORAFLEET_MAX_ATTEMPTS."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if self.webhook_url and not re.match(r"^https?://", self.webhook_url):
            raise ValueError("webhook_url must be an http(s) URL")
        return self


class EstimateRequest(JobSpec):
    """``POST /estimate``: a job body whose ``training_file`` may be left out."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [ESTIMATE_EXAMPLE]},
    )

    training_file: str | None = Field(  # type: ignore[assignment]
        None,
        max_length=4096,
        description="A file id of yours: adds tokens_per_epoch and step counts when given.",
    )

    def job_spec(self) -> JobSpec:
        """The body as a JobSpec (a placeholder file id when none was given)."""
        body = self.model_dump()
        body["training_file"] = self.training_file or "none"
        return JobSpec.model_validate(body)
