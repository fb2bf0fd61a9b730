"""The fleet as jobs see it: live workers, whether a job can ever run, and the fit estimate.

Submission refuses what no worker could ever run (``check_job_fits``, called by
``jobs.create_job``), and ``POST /estimate`` answers the same question with numbers. Both read the
workers table and the model's files only: no torch, no GPU, no worker round trip.

Which workers count: those not offline and heard from within ``STALE_LEASES`` leases. If none is
alive right now (a rolling restart, a scale-to-zero night) the last known shape of the fleet is
used instead, so queued work is not refused just because the workers are between lives. If no
worker has *ever* registered (a fresh install; the API started before any worker) every job is
accepted and queued: there is nothing to compare with yet.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.datasets import PREFERENCE, DatasetError, iter_examples
from shared.errors import InvalidInput
from shared.estimate import estimate
from shared.hub import check_hub_model
from shared.modelinfo import (
    ModelInfo,
    default_target_modules,
    read_model_info,
    resolve_base_model,
    resolve_target_modules,
)
from shared.models import File, Worker, utcnow
from shared.routing import Capacity, fits, no_fit_reason, requirements, split_over_nodes
from shared.services.files import check_method_fits_file
from shared.services.transitions import rowcount
from shared.spec import JobSpec
from shared.states import WorkerStatus
from shared.storage import Storage

# A worker silent this many leases is offline (the reaper marks it: mark_stale_workers_offline).
STALE_LEASES = 3
_GIB = 1024**3
TOKEN_SAMPLE_BYTES = 4 * 1024 * 1024  # datasets larger than this are counted on a prefix
CHAT_TOKENS_PER_MESSAGE = 4  # role markers and separators the chat template adds per message
_REGISTRY_LOCK_ID = 0x10FA_0DE5  # pg advisory lock held while a worker registers its devices


def stale_after(settings: Settings) -> float:
    """Seconds without a heartbeat after which a worker counts as offline."""
    return STALE_LEASES * settings.lease_seconds


def effective_status(worker: Worker, settings: Settings) -> WorkerStatus:
    """The worker's status, or ``offline`` when its heartbeat is older than ``stale_after``."""
    cutoff = utcnow() - timedelta(seconds=stale_after(settings))
    return WorkerStatus.OFFLINE if worker.last_heartbeat < cutoff else WorkerStatus(worker.status)


def list_workers(session: Session, settings: Settings) -> list[tuple[Worker, WorkerStatus]]:
    """All registered workers with their effective status, most recently seen first."""
    query = select(Worker).order_by(Worker.last_heartbeat.desc(), Worker.id)
    rows = session.scalars(query.execution_options(populate_existing=True))
    return [(w, effective_status(w, settings)) for w in rows]


def fleet_capacities(session: Session, settings: Settings) -> list[Capacity] | None:
    """What the workers offer: the live ones, else the last known; None if none ever registered."""
    workers = list_workers(session, settings)
    if not workers:
        return None
    live = [w for w, status in workers if status != WorkerStatus.OFFLINE] or [w for w, _ in workers]
    return [
        Capacity(w.gpus, w.gpu_type, w.gpu_memory_bytes, w.host_memory_bytes, w.procs) for w in live
    ]


# ---------------------------------------------------------------- the worker registry
class DeviceTaken(InvalidInput):
    """A worker tried to register a GPU another live worker owns."""


def _lock_registry(session: Session) -> None:
    """Serialise registrations (PostgreSQL), so two workers starting together cannot both take
    the same GPU; SQLite serialises writers by itself."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _REGISTRY_LOCK_ID})


def register_worker(
    session: Session,
    worker_id: str,
    hostname: str,
    gpus: int = 0,
    gpu_type: str | None = None,
    gpu_memory_bytes: int | None = None,
    procs: int = 1,
    version: str | None = None,
    queues: list[str] | None = None,
    gpu_uuids: list[str] | None = None,
    host_memory_bytes: int | None = None,
    settings: Settings | None = None,
) -> Worker:
    """Insert or refresh a worker's record when it starts; refuse a GPU another worker owns.

    Each worker owns its devices: two workers training on one GPU would each assume the whole
    memory the estimate counted. A device held by a live worker (heartbeat within
    ``stale_after``) refuses the registration with :class:`DeviceTaken`; an offline worker's
    devices are free again.
    """
    from shared.config import get_settings

    settings = settings or get_settings()
    now = utcnow()
    _lock_registry(session)
    if gpu_uuids:
        cutoff = now - timedelta(seconds=stale_after(settings))
        others = session.scalars(
            select(Worker).where(
                Worker.id != worker_id,
                Worker.status != WorkerStatus.OFFLINE.value,
                Worker.last_heartbeat >= cutoff,
            )
        )
        for other in others:
            shared = sorted(set(other.gpu_uuids or ()) & set(gpu_uuids))
            if shared:
                session.rollback()
                raise DeviceTaken(
                    f"GPU {shared[0]} is already held by live worker {other.id} on "
                    f"{other.hostname}; give each worker its own GPUs (CUDA_VISIBLE_DEVICES or "
                    "compose device_ids, see docs/operators.md)",
                    param="gpu_uuids",
                    code="device_taken",
                )
    row = session.get(Worker, worker_id, populate_existing=True) or Worker(id=worker_id)
    row.gpu_uuids = list(gpu_uuids) if gpu_uuids else None
    row.gpu_stats = None
    row.hostname = hostname
    row.gpus = gpus
    row.gpu_type = gpu_type
    row.gpu_memory_bytes = gpu_memory_bytes
    row.host_memory_bytes = host_memory_bytes
    row.procs = procs
    row.version = version
    row.queues = queues
    row.status = WorkerStatus.IDLE.value
    row.current_job = None
    row.last_heartbeat = now
    row.started_at = now
    session.add(row)
    session.commit()
    return row


def heartbeat_worker(
    session: Session,
    worker_id: str,
    status: WorkerStatus | None = None,
    current_job: str | None = None,
    gpu_stats: list[dict[str, Any]] | None = None,
) -> bool:
    """Record that the worker is alive (and what it does, and its devices' live use); False if
    it was never registered."""
    values: dict[str, Any] = {
        "last_heartbeat": utcnow(),
        "current_job": current_job,
        "gpu_stats": gpu_stats or None,
    }
    if status is not None:
        values["status"] = WorkerStatus(status).value
    done = rowcount(session, update(Worker).where(Worker.id == worker_id).values(**values))
    session.commit()
    return bool(done)


def mark_worker_offline(session: Session, worker_id: str) -> None:
    """The worker shut down cleanly (or was found dead)."""
    rowcount(
        session,
        update(Worker)
        .where(Worker.id == worker_id)
        .values(status=WorkerStatus.OFFLINE.value, current_job=None),
    )
    session.commit()


def mark_stale_workers_offline(session: Session, older_than: float) -> list[str]:
    """Workers silent for ``older_than`` seconds are marked offline; returns their ids."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    offline = WorkerStatus.OFFLINE.value
    ids = list(
        session.scalars(
            select(Worker.id).where(Worker.status != offline, Worker.last_heartbeat < cutoff)
        )
    )
    if ids:
        rowcount(
            session,
            update(Worker).where(Worker.id.in_(ids)).values(status=offline, current_job=None),
        )
    session.commit()
    return ids


# ---------------------------------------------------------------- jobs against the fleet
def locate_base_model(name: str, settings: Settings) -> Path | str:
    """Where ``base_model`` lives for this deployment: a local folder or an allowed hub id.

    The one resolver every reader uses (submit, estimate, the job runner, ``lorafleet train``):
    :func:`shared.modelinfo.resolve_base_model` with this deployment's models directory and hub
    allow-list. Raises ``ValueError`` saying why a name is refused.
    """
    return resolve_base_model(name, settings.models_path, settings.allowed_hub_models)


def model_info(spec: JobSpec, settings: Settings) -> ModelInfo | None:
    """The base model's shapes, or None for a hub id with no local copy (checked on the worker).

    An unreadable local folder (no safetensors, broken config) is refused here: the job would
    fail on the worker anyway, and the reason is clearer now.
    """
    try:
        where = locate_base_model(spec.base_model, settings)
        if not isinstance(where, Path):
            return None
        return read_model_info(where)
    except ValueError as exc:
        raise InvalidInput(str(exc), param="base_model") from exc


def with_default_targets(spec: JobSpec, info: ModelInfo | None) -> JobSpec:
    """Fill in ``lora.target_modules`` the job left out, from the model's own module names.

    Without a local copy of the model (a hub id) it stays null and the worker decides the same
    way from the loaded model.
    """
    if spec.lora.target_modules is not None or info is None:
        return spec
    chosen = default_target_modules(info.module_suffixes())
    lora = spec.lora.model_copy(update={"target_modules": chosen})
    return spec.model_copy(update={"lora": lora})


def check_target_modules(spec: JobSpec, info: ModelInfo) -> None:
    """Refuse ``lora.target_modules`` that match nothing, listing the modules the model has."""
    try:
        resolve_target_modules(info, spec.lora.target_modules)
    except ValueError as exc:
        raise InvalidInput(f"lora.target_modules: {exc}", param="lora.target_modules") from exc


def _world_size(gpus_required: int, worker: Capacity, settings: Settings) -> int:
    if gpus_required:
        return gpus_required
    return worker.gpus or worker.procs or settings.worker_procs


def _memory_limit(worker: Capacity) -> int | None:
    """What one job may use on ``worker``: one GPU's memory, or the host's RAM on a CPU worker."""
    return worker.gpu_memory_bytes if worker.gpus else worker.host_memory_bytes


def judge(
    spec: JobSpec,
    info: ModelInfo,
    worker: Capacity | None,
    settings: Settings,
    **dataset: int | None,
) -> dict[str, Any]:
    """``estimate`` of ``spec`` on ``worker`` (None: no worker known), with ``fits``/``reason``.

    On a GPU worker the per-device total must fit one GPU. On a CPU worker every training
    process holds its own copy of everything, so the per-process total times the processes must
    fit the host's RAM (``fits`` None when the worker did not report it).
    """
    gpus_required, _ = requirements(spec)
    # Ranks on one node (what shares its memory) and in the whole world (what the steps count).
    local = (
        _world_size(gpus_required, worker, settings) if worker is not None else gpus_required or 1
    )
    world = local * spec.resources.nodes
    on_gpu = worker is not None and worker.gpus > 0
    ram = worker.host_memory_bytes if worker is not None and not on_gpu else None
    answer = estimate(
        spec,
        info,
        world,
        worker.gpu_memory_bytes if on_gpu and worker is not None else None,
        dataset_rows=dataset.get("dataset_rows"),
        dataset_tokens=dataset.get("dataset_tokens"),
        gpu_type=worker.gpu_type if on_gpu and worker is not None else None,
        cpu_memory_per_process=ram // local if ram is not None else None,
    )
    if worker is None or (not on_gpu and ram is None):
        per = answer["memory_bytes"]["total"] / _GIB
        who = "no worker has registered yet" if worker is None else "the worker reported no RAM"
        answer["reason"] = f"{who}; the job needs about {per:.2f} GiB per training process"
    if ram is not None:
        need = answer["memory_bytes"]["total"] * local
        answer["fits"] = need <= ram
        per, total, have = (answer["memory_bytes"]["total"] / _GIB, need / _GIB, ram / _GIB)
        if answer["fits"]:
            answer["reason"] = (
                f"needs about {total:.2f} GiB of {have:.2f} GiB RAM ({local} x {per:.2f}, "
                f"{answer['strategy']})"
            )
        else:
            answer["reason"] = (
                f"needs about {total:.2f} GiB of RAM ({local} training process(es) x "
                f"{per:.2f} GiB, {answer['strategy']}) but the largest CPU worker has "
                f"{have:.2f} GiB; lower training.batch_size or training.max_seq_length, or set "
                "training.gradient_checkpointing"
                + (", or run fewer processes per job (LORAFLEET_WORKER_PROCS)" if local > 1 else "")
            )
    return answer


def check_sequence_length(spec: JobSpec, info: ModelInfo) -> None:
    """Refuse ``training.max_seq_length`` beyond the model's positions (it could only fail)."""
    limit = info.max_position_embeddings
    if isinstance(limit, int) and spec.training.max_seq_length > limit:
        raise InvalidInput(
            f"training.max_seq_length {spec.training.max_seq_length} exceeds the {limit} "
            f"positions of model {spec.base_model!r} (max_position_embeddings); set "
            f"training.max_seq_length to {limit} or less",
            param="training.max_seq_length",
            code="sequence_too_long",
        )


def too_few_nodes(spec: JobSpec, fitting: Sequence[Capacity]) -> tuple[str, str] | None:
    """Why a gang of ``resources.nodes`` cannot ever form on the ``fitting`` workers, as
    (param, message); None if it can.

    Busy workers count: a job waits for them. Offline ones do not (unless the whole fleet is,
    see :func:`fleet_capacities`).
    """
    res = spec.resources
    if res.nodes <= len(fitting):
        return None
    per = res.node_gpus
    what = f"with at least {per} GPU(s)" if per else "(any worker)"
    gang = (
        f"the job needs {res.nodes} workers at once (one gang) but only {len(fitting)} "
        f"registered worker(s) {what} can take it"
    )
    largest = max((w.gpus for w in fitting), default=0)
    if isinstance(res.gpus, int) and res.gpus > largest and res.gpus_per_node == per:
        return (
            "resources.gpus",
            f"resources.gpus: {res.gpus} GPUs requested but the largest worker has {largest}; "
            f"split into {res.nodes} nodes of {per} GPUs, {gang}",
        )
    return (
        "resources.nodes",
        f"resources.nodes: {gang}; lower resources.nodes (or resources.gpus_per_node) or "
        "start more workers",
    )


def with_nodes(session: Session, spec: JobSpec, settings: Settings) -> JobSpec:
    """``spec`` with a ``gpus`` count larger than any worker split into nodes (routing rule)."""
    return split_over_nodes(spec, fleet_capacities(session, settings) or [])


def check_job_fits(
    session: Session, spec: JobSpec, settings: Settings, info: ModelInfo | None
) -> None:
    """Refuse a job that could never run: model shape, routing, then memory.

    ``info`` is the caller's ``model_info``; None means a hub id without a local copy, which is
    looked up on the hub instead (``check_hub_model``: refused when the hub says it does not
    exist, accepted when the hub cannot be reached, the worker then checks first). Memory is
    judged against the largest worker the job may run on: GPU memory, or RAM for CPU workers
    (workers that reported neither are not judged).
    """
    if info is None:
        check_hub_model(spec.base_model, settings)
    else:
        check_target_modules(spec, info)
        check_sequence_length(spec, info)
    fleet = fleet_capacities(session, settings)
    if fleet is None:
        return
    gpus_required, gpu_type = requirements(spec)
    refused = no_fit_reason(gpus_required, gpu_type, fleet)
    if refused is not None:
        raise InvalidInput(refused[1], param=refused[0], code="no_worker_fits")
    candidates = [w for w in fleet if fits(gpus_required, gpu_type, w)]
    gang = too_few_nodes(spec, candidates)
    if gang is not None:
        raise InvalidInput(gang[1], param=gang[0], code="not_enough_workers")
    if info is None:
        return
    if any(_memory_limit(w) is None for w in candidates):
        return
    reasons = []
    for worker in sorted(candidates, key=lambda w: -(_memory_limit(w) or 0)):
        answer = judge(spec, info, worker, settings)
        if answer["fits"]:
            return
        reasons.append(answer["reason"])
    where = "worker's GPU" if all(w.gpus for w in candidates) else "worker"
    raise InvalidInput(
        f"the job fits on no {where}: {reasons[0]}", param="training", code="no_worker_fits"
    )


def _count_tokens(storage: Storage, record: File, info: ModelInfo | None) -> tuple[int | None, str]:
    """Tokens in a dataset file: exact up to TOKEN_SAMPLE_BYTES, extrapolated by bytes beyond.

    Uses the model's ``tokenizer.json`` through ``tokenizers`` (Rust, no torch). Chat rows get
    CHAT_TOKENS_PER_MESSAGE per message for the template; other templates differ by a few tokens
    a row. Without a tokenizer file the count is bytes / 4, a rough rule for English text.
    """
    blob = bytearray()
    for chunk in storage.open_stream(record.storage_key):
        blob.extend(chunk)
        if len(blob) >= TOKEN_SAMPLE_BYTES:
            break
    complete = bytes(blob[: blob.rfind(b"\n") + 1]) if len(blob) < record.bytes else bytes(blob)
    tokenizer_file = info.path / "tokenizer.json" if info is not None else None
    if tokenizer_file is None or not tokenizer_file.is_file() or not complete:
        return record.bytes // 4, "bytes/4"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    texts: list[str] = []
    extra = 0
    try:
        for row in iter_examples(io.BytesIO(complete)):
            # A preference pair trains both of its sequences (the prompt twice).
            for example in row.pair() if row.format == PREFERENCE else (row,):
                if example.messages:
                    texts.extend(m.content for m in example.messages)
                    extra += CHAT_TOKENS_PER_MESSAGE * len(example.messages)
                else:
                    texts.append("".join(text for text, _ in example.segments))
    except DatasetError:
        return record.bytes // 4, "bytes/4"
    counted = extra + sum(len(e.ids) for e in tokenizer.encode_batch(texts))
    if len(complete) >= record.bytes:
        return counted, "exact"
    return int(counted * record.bytes / max(len(complete), 1)), "sampled"


def estimate_job(
    session: Session,
    storage: Storage,
    owner: str,
    spec: JobSpec,
    training_file: str | None,
    settings: Settings,
) -> dict[str, Any]:
    """``POST /estimate``: parameters, per-device memory, steps and ``fits`` on this fleet.

    ``fits`` is judged against the largest worker the job's routing allows: GPU workers first
    (one GPU's memory), else the CPU worker with the most RAM (all its training processes
    together); null when no worker reported its memory, or none is registered.
    """
    spec = with_nodes(session, spec, settings)
    info = model_info(spec, settings)
    if info is None:
        raise InvalidInput(
            f"base_model {spec.base_model!r}: a hub model without a local copy in the models "
            "directory cannot be estimated",
            param="base_model",
        )
    check_target_modules(spec, info)
    rows = tokens = None
    counted = None
    if training_file:
        record = session.get(File, training_file)
        if record is None or record.owner != owner:
            raise InvalidInput(
                f"training_file {training_file!r} names no file of yours",
                param="training_file",
            )
        check_method_fits_file(spec, record, "training_file")
        rows = record.rows
        tokens, counted = _count_tokens(storage, record, info)
    gpus_required, gpu_type = requirements(spec)
    fleet = fleet_capacities(session, settings) or []
    routable = [w for w in fleet if fits(gpus_required, gpu_type, w)]
    target = max(routable, key=lambda w: (w.gpus > 0, _memory_limit(w) or 0), default=None)
    answer = judge(spec, info, target, settings, dataset_rows=rows, dataset_tokens=tokens)
    answer["model"] = info.to_dict()
    answer["dataset"] = {"rows": rows, "tokens": tokens, "tokens_counted": counted}
    answer["fleet"] = {
        "workers": len(fleet),
        "routable_workers": len(routable),
        "gpu_type": target.gpu_type if target else None,
        "gpu_memory_bytes": target.gpu_memory_bytes if target and target.gpus else None,
        "host_memory_bytes": target.host_memory_bytes if target and not target.gpus else None,
    }
    answer["fleet"]["nodes"] = spec.resources.nodes
    refused = no_fit_reason(gpus_required, gpu_type, fleet) if fleet else None
    if refused is not None:
        answer["fits"] = False
        answer["reason"] = refused[1]
    elif fleet and (gang := too_few_nodes(spec, routable)) is not None:
        answer["fits"] = False
        answer["reason"] = gang[1]
    return answer


__all__ = [
    "STALE_LEASES",
    "check_job_fits",
    "DeviceTaken",
    "check_sequence_length",
    "judge",
    "check_target_modules",
    "estimate_job",
    "fleet_capacities",
    "heartbeat_worker",
    "list_workers",
    "locate_base_model",
    "mark_stale_workers_offline",
    "mark_worker_offline",
    "model_info",
    "register_worker",
    "stale_after",
    "too_few_nodes",
    "with_nodes",
]
