"""``training.init_adapter``: the earlier adapter a job starts from, found and checked.

A reference is what inference's ``model`` accepts, resolved by the same function
(``shared.services.adapters.locate_adapter``): a succeeded job id of the same owner, that job's
``fine_tuned_model`` name, or one of its committed checkpoint names (a running or failed job's
too). At submit, :func:`check_init_adapter` refuses what could never work, naming the field: what
the resolver refuses (another owner's or an unknown job, one that has not succeeded, deleted
artifacts, a checkpoint not stored), another base model, or a LoRA shape (r, alpha, target
modules) other than this job's (the weights would not fit, or would be scaled differently).
Dropout may differ: it shapes training, not the adapter. The worker resolves the same reference
with :func:`find_adapter` to download it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.models import Job
from shared.services.adapters import AdapterUnavailable, StoredAdapter, locate_adapter
from shared.spec import JobSpec

PARAM = "training.init_adapter"


def find_adapter(session: Session, owner: str, reference: str) -> StoredAdapter:
    """The owner's stored adapter ``reference`` names (``shared.services.adapters``' rules, the
    same as inference's); InvalidInput naming the field otherwise."""
    try:
        return locate_adapter(session, owner, reference)
    except AdapterUnavailable as exc:
        raise InvalidInput(f"{PARAM}: {exc.message}", param=PARAM) from None


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
    parent = find_adapter(session, owner, reference).job
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
