"""One settings object for every lorafleet process (api, worker, cli), read from ``LORAFLEET_*``.

Every command reads the same variables so that `serve`, `worker`, `up` and `train` started in one
shell agree on where the database, broker and artifacts live without further flags.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration; defaults give the zero-setup embedded mode under ``./data``."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    data_dir: Path = Field(
        Path("./data"),
        description="Holds the SQLite file, the embedded broker's folders and local storage.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///$DATA_DIR/lorafleet.db."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default the no-server filesystem transport in DATA_DIR."
    )
    storage_url: str | None = Field(
        None, description="file:///path or s3://bucket/prefix; default $DATA_DIR/storage."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto...).")
    models_dir: Path | None = Field(
        None, description="Base models by folder name; default $DATA_DIR/models."
    )
    allowed_hub_models: str = Field(
        "*",
        description="Comma-separated hub ids `base_model` may name when it is no local folder; "
        "'*' allows any id of the form org/name, '' allows none.",
    )
    worker_procs: int = Field(1, ge=1, le=64, description="DDP processes per job on a CPU worker.")
    worker_memory_limit_bytes: int | None = Field(
        None,
        gt=0,
        description="Bound on a job's training processes' resident memory; default 90% of the "
        "memory free when the job starts. Over it, the job ends out_of_memory.",
    )
    worker_gpu_type: str | None = Field(None, description="Override the detected GPU type label.")
    lease_seconds: float = Field(30.0, gt=0, description="A running job's lease.")
    gang_wait_seconds: float = Field(
        120.0,
        gt=0,
        description="How long a worker holds a seat in a multi-node job's gang that is not full "
        "yet; then it gives the seat back and takes other work once before trying again.",
    )
    worker_address: str | None = Field(
        None,
        max_length=255,
        description="Address the other workers of a gang reach this worker at (the rendezvous "
        "host when it is node 0); default: this host name's address.",
    )
    rendezvous_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="TCP port this worker hosts a gang's rendezvous on when it is node 0; "
        "0: a free port picked at each join (open a fixed one in firewalls).",
    )
    requeue_grace_seconds: float = Field(
        60.0, gt=0, description="A queued job older than this with no claim is re-published."
    )
    max_attempts: int = Field(3, ge=1, description="Attempts before a job that keeps dying fails.")
    checkpoints_keep: int | None = Field(
        None,
        ge=1,
        description="Newest checkpoints kept per job (disk and storage); default the engine's "
        "CheckpointPolicy (3).",
    )
    db_lock_timeout_seconds: float = Field(
        5.0, gt=0, description="PostgreSQL lock_timeout: the longest a statement waits for a lock."
    )
    db_idle_in_transaction_seconds: float = Field(
        60.0,
        gt=0,
        description="PostgreSQL idle_in_transaction_session_timeout: a session stalled inside a "
        "transaction (a frozen worker) is ended and its locks released after this long.",
    )
    progress_interval_seconds: float = Field(
        1.0, gt=0, description="Minimum time between progress writes to the database."
    )
    # Security (issue 5): auth on unless explicitly disabled, and then only on loopback.
    auth_disabled: bool = Field(False, description="Serve without API keys (loopback only).")
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0, description="Largest upload.")
    max_rows: int = Field(1_000_000, gt=0, description="Most rows a dataset may hold.")
    max_line_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Longest dataset line.")
    max_active_jobs_per_owner: int = Field(
        50, gt=0, description="Queued + running jobs one owner may hold."
    )
    max_json_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest JSON request body (job bodies are a few KB)."
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without a key (otherwise it needs an admin key)."
    )
    adapter_url_expires_seconds: int = Field(
        300, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned adapter download URLs."
    )
    webhook_secret: str = Field("", description="HMAC key for webhook signatures.")
    webhook_allow: str = Field(
        "",
        description="Comma list of host names or CIDRs a webhook_url may reach although they are "
        "loopback, private, link-local or metadata addresses; empty: public addresses only.",
    )
    hub_check_timeout_seconds: float = Field(
        3.0,
        ge=0,
        description="How long submit waits for the model hub to confirm a hub id exists; 0 skips "
        "the check (the worker still checks it first). HF_ENDPOINT / HF_HUB_OFFLINE apply.",
    )
    # Inference (issue 13): `lorafleet inference` servers register themselves in the database.
    inference_url: str | None = Field(
        None,
        description="An external OpenAI-compatible server (vLLM with --enable-lora) the API "
        "proxies /v1/chat/completions and /v1/completions to, instead of a registered "
        "`lorafleet inference` server.",
    )
    inference_api_key: str | None = Field(
        None,
        description="Bearer key sent to LORAFLEET_INFERENCE_URL; a `lorafleet inference` server "
        "given this key accepts it (otherwise it makes its own and registers it).",
    )
    inference_max_tokens: int = Field(
        1024, ge=1, le=1_000_000, description="Ceiling of max_tokens per completion request."
    )
    inference_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="Memory the inference server's loaded base models may take together (least "
        "recently used evicted); default half the RAM on CPU, 80% of the GPU's memory.",
    )
    inference_max_batch: int = Field(
        32, ge=1, le=1024, description="Most requests the inference server decodes in one batch."
    )
    inference_batch_wait_ms: float = Field(
        10.0,
        ge=0,
        le=10_000,
        description="How long a new batch waits for more requests to join it.",
    )
    inference_max_adapters: int = Field(
        64, ge=1, le=10_000, description="Adapters kept attached per base model (LRU)."
    )
    inference_adapter_cache_bytes: int = Field(
        10 * 1024**3,
        ge=1,
        description="Disk the inference server's adapter cache may take (bytes); the least "
        "recently used adapters are deleted past it (never one in use), and fetched again when "
        "asked for.",
    )
    inference_dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="Weights' dtype on the inference server: auto = bfloat16 on GPU, float32 on "
        "CPU.",
    )
    inference_timeout_seconds: float = Field(
        300.0, gt=0, description="How long the API waits for an inference server's answer."
    )
    sync_db_echo: bool = False

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'lorafleet.db').resolve()}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.storage_url is None:
            self.storage_url = f"file://{(self.data_dir / 'storage').resolve()}"
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        self.models_dir = self.models_dir.expanduser()
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker (shared by api and workers on one host)."""
        return (self.data_dir / "broker").resolve()

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def models_path(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests change the environment between servers)."""
    get_settings.cache_clear()
