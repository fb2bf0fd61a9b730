"""``training.init_adapter``: the earlier adapter a job starts from, found and checked.

A reference is a succeeded job id of the same owner, that job's ``fine_tuned_model`` name, or one
of its checkpoint names (``shared.model_names``). At submit, :func:`check_init_adapter` refuses
what could never work, naming the field: another owner's or an unknown job, one that has not
succeeded or whose artifacts were deleted, a checkpoint that is not (or no longer) stored, another
base model, or a LoRA shape (r, alpha, target modules) other than this job's (the weights would
not fit, or would be scaled differently). Dropout may differ: it shapes training, not the adapter.
The worker resolves the same reference with :func:`find_adapter` to download it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.model_names import JOB_ID, parse_model_name
from shared.models import Checkpoint, Job
from shared.spec import JobSpec
from shared.states import SUCCEEDED

PARAM = "training.init_adapter"
_BARE_JOB = re.compile(rf"^{JOB_ID}$")


@dataclass(frozen=True)
class AdapterSource:
    """Where an init adapter lives in storage."""

    job_id: str
    step: int | None  # None: the job's final adapter
    key: str  # the adapter .tar.gz (final), or the checkpoint's prefix
    tarball: bool


def find_adapter(session: Session, owner: str, reference: str) -> tuple[Job, AdapterSource]:
    """The owner's succeeded job (and checkpoint) ``reference`` names; InvalidInput otherwise."""
    step: int | None = None
    if _BARE_JOB.match(reference):
        job_id = reference
    else:
        parsed = parse_model_name(reference)
        if parsed is None:
            raise InvalidInput(
                f"{PARAM} {reference!r} is not a job id (ftjob-...), a fine-tuned model name "
                "(ft:...) or a checkpoint name (ft:...:ckpt-step-N)",
                param=PARAM,
            )
        job_id, step = parsed.job_id, parsed.step
    parent = session.get(Job, job_id)
    if parent is None or parent.owner != owner:
        raise InvalidInput(f"{PARAM}: no job {job_id} of yours", param=PARAM)
    if parent.status != SUCCEEDED.value:
        raise InvalidInput(
            f"{PARAM}: job {job_id} is {parent.status}; only a succeeded job's adapter (or one "
            "of its checkpoints) can be trained on",
            param=PARAM,
        )
    if parent.deleted_at is not None:
        raise InvalidInput(f"{PARAM}: job {job_id} was deleted with its adapter", param=PARAM)
    if step is None:
        if parent.adapter_key is None:
            raise InvalidInput(f"{PARAM}: job {job_id} has no stored adapter", param=PARAM)
        return parent, AdapterSource(job_id, None, parent.adapter_key, tarball=True)
    row = session.scalar(
        select(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.step == step, Checkpoint.sha256.is_not(None)
        )
    )
    if row is None:
        kept = session.scalars(
            select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        ).all()
        raise InvalidInput(
            f"{PARAM}: job {job_id} keeps no checkpoint at step {step} (kept: "
            f"{', '.join(map(str, kept)) or 'none'})",
            param=PARAM,
        )
    return parent, AdapterSource(job_id, step, row.storage_key, tarball=False)


def parent_lora(parent: Job) -> dict[str, Any]:
    """The LoRA settings the parent trained with (the manifest's, with targets resolved)."""
    manifest = parent.manifest or {}
    return dict(manifest.get("lora") or parent.lora)


def check_init_adapter(session: Session, owner: str, spec: JobSpec) -> None:
    """Refuse an init adapter that does not exist for this owner or does not fit this job.

    ``spec.lora.target_modules`` must be resolved (``with_default_targets``) when the model is
    local; a hub model's targets are compared on the worker by the engine.
    """
    reference = spec.training.init_adapter
    if reference is None:
        return
    parent, _ = find_adapter(session, owner, reference)
    if parent.base_model != spec.base_model:
        raise InvalidInput(
            f"{PARAM}: job {parent.id} adapted base_model {parent.base_model!r}, this job "
            f"{spec.base_model!r}; an adapter only fits the model it was trained on",
            param=PARAM,
        )
    theirs = parent_lora(parent)
    ours = spec.lora
    pairs: list[tuple[str, Any, Any]] = [
        ("r", ours.r, theirs.get("r")),
        ("alpha", float(ours.alpha), float(theirs.get("alpha", ours.alpha))),
    ]
    if ours.target_modules is not None and theirs.get("target_modules") is not None:
        pairs.append(
            ("target_modules", _modules(ours.target_modules), _modules(theirs["target_modules"]))
        )
    for field, mine, parents in pairs:
        if mine != parents:
            raise InvalidInput(
                f"lora.{field} {_show(mine)} differs from the init adapter's {_show(parents)} "
                f"(job {parent.id}); set lora.{field} to {_show(parents)} to continue from it",
                param=f"lora.{field}",
            )


def _modules(value: Any) -> Any:
    return value if isinstance(value, str) else sorted(set(value))


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
