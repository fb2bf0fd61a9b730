"""SQLAlchemy 2 models: the database is the truth for every job, file, key and worker.

Constraint names come from one naming convention so Alembic (and SQLite batch mode, which has to
recreate tables by name) can always find them. Every ``*_at`` column is timezone-aware and always
comes back as an aware UTC datetime, on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.model_names import fine_tuned_model_name
from shared.states import SUCCEEDED

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64 bits for long histories.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Aware ``now`` in UTC: the only clock the services use."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that also comes back aware from SQLite (which stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a timezone-aware column")
        value = value.astimezone(UTC)
        # SQLite keeps the text as given; store UTC without offset so comparisons sort right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """An API key; only the sha256 of the secret is stored, so a database leak leaks no keys."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class File(Base):
    """An uploaded, validated JSONL dataset; the bytes live in storage under ``storage_key``."""

    __tablename__ = "files"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        # An owner re-uploading the same bytes gets the file already stored (files.create_file).
        Index(None, "owner", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Job(Base):
    """A fine-tuning job. Status changes only through conditional UPDATEs in ``shared.services``."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        # The dispatch order: what a queue runs next.
        Index(None, "status", "queue", "priority", "created_at"),
        # GET /jobs: an owner's jobs newest first.
        Index(None, "owner", "created_at"),
        # runs.claim_next: the queued jobs a worker of N GPUs can run.
        Index(None, "status", "gpus_required"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    queue: Mapped[str] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    adapter_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    adapter_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # Routing copies of spec.resources, as columns so the claim query can filter in SQL:
    # gpus_required 0 means "any worker" (resources.gpus "all" or 0, CPU workers included).
    gpus_required: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    gpu_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # +1 at every claim, never decremented: the fencing token of an attempt (runs.Lease).
    lease_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Routing copy of spec.resources.nodes: workers that train the job together (a gang, see
    # shared.services.gangs); gpus_required is then per node.
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Set when the owner deleted a final job: its artifacts are gone from storage, the row stays
    # as a tombstone (ids are never reused, and a webhook or a log line naming it still resolves).
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # ddp or fsdp: what training.strategy resolved to when the latest run started (engine's
    # Started record); null until then.
    strategy: Mapped[str | None] = mapped_column(String(8), nullable=True)

    # Views of the spec and state that the public schemas read (``from_attributes``).
    @property
    def suffix(self) -> str | None:
        """The label the job body gave its fine-tuned model name."""
        return (self.spec or {}).get("suffix")

    @property
    def method(self) -> dict[str, Any]:
        """``{"type": "supervised"}`` for jobs whose body predates ``method``."""
        return dict((self.spec or {}).get("method") or {"type": "supervised"})

    @property
    def lora(self) -> dict[str, Any]:
        return dict((self.spec or {}).get("lora") or {})

    @property
    def training(self) -> dict[str, Any]:
        return dict((self.spec or {}).get("training") or {})

    @property
    def resources(self) -> dict[str, Any]:
        return dict((self.spec or {}).get("resources") or {})

    @property
    def error(self) -> dict[str, str] | None:
        """``{code, message}`` of a failed job, None otherwise."""
        if not (self.error_code or self.error_message):
            return None
        return {
            "code": self.error_code or "error",
            "message": self.error_message or self.error_code or "",
        }

    @property
    def fine_tuned_model(self) -> str | None:
        """The adapter's model name once the job succeeded (``shared.model_names``)."""
        if self.status != SUCCEEDED.value or self.deleted_at is not None:
            return None
        return fine_tuned_model_name(self.base_model, self.owner, self.suffix, self.id)


class JobEvent(Base):
    """A human-readable line in a job's history; the integer id is the SSE/pagination cursor."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobMetric(Base):
    """One point of the per-step training curve (unique per job and step: retries overwrite)."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    # DPO jobs only (worker.training.events.DPO_METRICS): train step, then validation.
    rewards_chosen: Mapped[float | None] = mapped_column(Float, nullable=True)
    rewards_rejected: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_rewards_chosen: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_rewards_rejected: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_reward_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_reward_margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    """A checkpoint uploaded to storage; recorded only after the upload finished."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The attempt (lease epoch) and worker that committed it, holding the lease at the time.
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)


class Worker(Base):
    """A Celery worker node (id = its node name) as it last reported itself."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    gpu_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # RAM of the host (or its cgroup limit): what CPU training processes share.
    host_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    procs: Mapped[int] = mapped_column(Integer, default=1)
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="idle")
    current_job: Mapped[str | None] = mapped_column(String(40), nullable=True)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queues: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # The devices this worker owns (GPU UUIDs): no two live workers may hold the same one.
    gpu_uuids: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Per device, as of the last heartbeat: index, uuid, memory used/total, utilisation.
    gpu_stats: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class GangMember(Base):
    """A worker's seat in the gang of one attempt of a multi-node job (``shared.services.gangs``).

    ``epoch`` is the attempt's ``jobs.lease_epoch`` (while the gang forms: the epoch its start
    will set), ``slot`` the node rank. Slot 0's worker hosts the rendezvous at ``host:port``.
    A seat has its own lease: the reaper requeues the whole gang when one member stops renewing.
    Seats of a gang that never started are deleted when their worker leaves; those of a started
    gang stay as its record (``left_at`` set when the member's run ended).
    """

    __tablename__ = "gang_members"
    __table_args__ = (
        UniqueConstraint("job_id", "epoch", "slot"),
        UniqueConstraint("job_id", "epoch", "worker_id"),
        Index(None, "worker_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    slot: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    ranks: Mapped[int] = mapped_column(Integer)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class InferenceServer(Base):
    """A ``lorafleet inference`` process as it last reported itself (``shared.services.inference``).

    The API reads this table to find a server for a request: no URL to configure. ``token`` is the
    bearer secret the server generated at start and expects on every request, so the only way to
    reach its adapters is through the API's authorisation (or with database access).
    """

    __tablename__ = "inference_servers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    url: Mapped[str] = mapped_column(String(1024))
    hostname: Mapped[str] = mapped_column(String(255))
    token: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(128))
    # Base models it holds loaded right now (a request goes to a server that has its base).
    base_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    adapters: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16), default="idle")
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
