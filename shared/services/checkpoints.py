"""Per-checkpoint adapters: any saved step can be downloaded and used like the final adapter.

A checkpoint lives in storage as loose files under ``Checkpoint.storage_key`` (a prefix). The
download holds only what peft needs to load the adapter (plus ``state.json``, which says what step
and loss it is): the optimizer state in ``trainer_state.pt`` is only for resuming, several times
the adapter's size, and a pickle nobody should be handed to load.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Checkpoint
from shared.services.jobs import list_checkpoints
from shared.storage import Storage

ARCHIVE_FILES = ("adapter_config.json", "adapter_model.safetensors", "state.json")
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")


def get_checkpoint(session: Session, owner: str, job_id: str, step: int) -> Checkpoint:
    """The owner's checkpoint of ``job_id`` at ``step``; NotFound for an unknown job or step."""
    for row in list_checkpoints(session, owner, job_id):
        if row.step == step:
            return row
    raise NotFound(f"job {job_id} has no checkpoint at step {step}", param="step")


def write_adapter_archive(storage: Storage, checkpoint: Checkpoint, dest: Path) -> int:
    """Write the checkpoint's adapter as a .tar.gz (top folder ``adapter/``); returns its size.

    The layout matches the final adapter download, so one unpacking recipe serves both. Raises
    NotFound when the files are gone (pruned between listing and download).
    """
    prefix = checkpoint.storage_key.rstrip("/") + "/"
    present = set(storage.list(prefix))
    missing = [name for name in REQUIRED if prefix + name not in present]
    if missing:
        raise NotFound(
            f"checkpoint at step {checkpoint.step} is no longer in storage (missing {missing[0]})",
            param="step",
        )
    with tempfile.TemporaryDirectory() as folder, tarfile.open(dest, "w:gz") as tar:
        for name in ARCHIVE_FILES:
            if prefix + name not in present:
                continue
            local = Path(folder, name)
            try:
                storage.get_file(prefix + name, local)
            except FileNotFoundError:
                raise NotFound(
                    f"checkpoint at step {checkpoint.step} was pruned while downloading",
                    param="step",
                ) from None
            tar.add(local, arcname=f"adapter/{name}")
    return dest.stat().st_size
