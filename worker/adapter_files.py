"""Adapter files in object storage: how they are written, and fetched back verified.

Two storage layouts, each with the check its writer recorded:

- ``archive`` (a succeeded job's ``adapter.tar.gz``, :func:`make_adapter_tarball`): the tarball's
  sha256 must equal the job's ``adapter_sha256``, then every file listed in the ``manifest.json``
  inside must match its sha256 there (the manifest the engine wrote beside the adapter).
- ``folder`` (a checkpoint's loose files): the digest of the whole folder (:func:`folder_digest`,
  what the worker recorded when the lease holder committed it). The optimizer state is only
  needed to verify; it is not kept.

:func:`download_adapter` is the one way adapter files come back from storage: the inference
server's cache and a job that starts from an earlier adapter (``training.init_adapter``) both use
it, so neither loads a byte that does not match what was recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from shared.datasets import sha256_file
from shared.services.adapters import Adapter
from shared.storage import Storage

__all__ = [
    "ADAPTER_FILES",
    "MANIFEST",
    "PEFT_FILES",
    "AdapterCorrupt",
    "AdapterError",
    "AdapterMissing",
    "download_adapter",
    "folder_digest",
    "make_adapter_tarball",
]

# What peft needs to load an adapter (plus the manifest that vouches for them).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
# What a final adapter's archive holds.
ADAPTER_FILES = (*PEFT_FILES, MANIFEST, "README.md")


class AdapterError(Exception):
    """An adapter cannot be used; the message says why."""


class AdapterCorrupt(AdapterError):
    """The bytes in storage do not match the recorded checksum."""


class AdapterMissing(AdapterError):
    """The adapter is no longer in storage (its job was deleted, its checkpoint pruned)."""


def folder_digest(folder: Path) -> str:
    """sha256 over (name, content) of every file of a checkpoint folder, in name order."""
    digest = hashlib.sha256()
    for item in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(item.name.encode() + b"\0")
        with open(item, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def make_adapter_tarball(folder: Path, dest: Path) -> tuple[str, int]:
    """A .tar.gz of the peft folder (+ manifest) with a top-level ``adapter/`` directory."""
    with tarfile.open(dest, "w:gz") as tar:
        for name in ADAPTER_FILES:
            if (folder / name).exists():
                tar.add(folder / name, arcname=f"adapter/{name}")
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    return digest, dest.stat().st_size


def download_adapter(storage: Storage, adapter: Adapter, folder: Path, scratch: Path) -> None:
    """Fill the empty ``folder`` with ``adapter``'s peft files (and, for an archive, its
    manifest), verified against the recorded digest; ``scratch`` holds the download meanwhile.
    AdapterMissing / AdapterCorrupt otherwise (``folder`` may then hold part of the files)."""
    if adapter.layout == "archive":
        _fetch_archive(storage, adapter, scratch / "adapter.tar.gz", folder)
    elif adapter.layout == "folder":
        _fetch_folder(storage, adapter, folder)
    else:
        raise AdapterError(f"adapter {adapter.id}: unknown layout {adapter.layout!r}")
    missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
    if missing:
        raise AdapterCorrupt(f"adapter {adapter.id} has no {missing[0]}")


def _get(storage: Storage, adapter: Adapter, key: str, dest: Path) -> None:
    try:
        storage.get_file(key, dest)
    except FileNotFoundError:
        raise AdapterMissing(
            f"adapter {adapter.id} is no longer in storage (was its job deleted?)"
        ) from None


def _fetch_archive(storage: Storage, adapter: Adapter, tarball: Path, folder: Path) -> None:
    _get(storage, adapter, adapter.key, tarball)
    digest = hashlib.sha256()
    with open(tarball, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != adapter.sha256:
        raise AdapterCorrupt(
            f"adapter {adapter.id} in storage does not match its recorded sha256 "
            f"(stored {digest.hexdigest()[:12]}..., recorded {adapter.sha256[:12]}...)"
        )
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            inside = PurePosixPath(member.name)
            # Only regular files directly under adapter/: no links, no paths out of the folder.
            if not member.isfile() or inside.parent != PurePosixPath("adapter"):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(folder / inside.name, "wb") as out:
                shutil.copyfileobj(source, out)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise AdapterCorrupt(f"adapter {adapter.id} has no {MANIFEST}")
    files = json.loads(manifest_path.read_text()).get("files") or {}
    for name in PEFT_FILES:
        if name not in files:
            raise AdapterCorrupt(f"adapter {adapter.id}: {MANIFEST} does not list {name}")
    for name, expected in files.items():
        path = folder / PurePosixPath(name).name
        if not path.is_file() or sha256_file(str(path)) != expected:
            raise AdapterCorrupt(
                f"adapter {adapter.id}: {name} does not match the sha256 in {MANIFEST}"
            )


def _fetch_folder(storage: Storage, adapter: Adapter, folder: Path) -> None:
    prefix = adapter.key.rstrip("/") + "/"
    keys = storage.list(prefix)
    if not keys:
        raise AdapterMissing(f"checkpoint {adapter.id} is no longer in storage")
    for key in keys:
        name = key[len(prefix) :]
        if "/" in name or name.startswith("."):
            continue
        _get(storage, adapter, key, folder / name)
    if folder_digest(folder) != adapter.sha256:
        raise AdapterCorrupt(
            f"checkpoint {adapter.id} in storage does not match its recorded sha256"
        )
    for item in folder.iterdir():
        if item.name not in PEFT_FILES:
            item.unlink()
