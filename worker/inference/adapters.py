"""Adapters from object storage into a local cache, each checked before anything loads it.

The cache is content-addressed: ``<cache>/<sha256>/`` holds the peft files of the adapter whose
recorded checksum is ``sha256``, so a folder that exists was verified when it was written (it is
assembled in a temporary folder and renamed into place). Two checks, one per storage layout:

- ``archive`` (a succeeded job's ``adapter.tar.gz``): the tarball's sha256 must equal the job's
  ``adapter_sha256``, then every file listed in the ``manifest.json`` inside must match its
  sha256 there (the manifest the engine wrote beside the adapter).
- ``folder`` (a checkpoint's loose files): the digest of the whole folder (``folder_digest``,
  what the worker recorded when it committed the checkpoint). The optimizer state is only needed
  to verify; it is not kept.

A mismatch is :class:`AdapterCorrupt` (nothing is cached, the next request tries again); an
adapter gone from storage is :class:`AdapterMissing`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path, PurePosixPath

from shared.datasets import sha256_file
from shared.services.inference import Adapter
from shared.storage import Storage
from worker.job_runner import folder_digest

# What peft needs to load an adapter (plus the manifest that vouches for them).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"


class AdapterError(Exception):
    """An adapter cannot be served; the message says why."""


class AdapterCorrupt(AdapterError):
    """The bytes in storage do not match the recorded checksum."""


class AdapterMissing(AdapterError):
    """The adapter is no longer in storage (its job was deleted, its checkpoint pruned)."""


class AdapterStore:
    """Fetches and verifies adapters; safe to call from many request threads at once."""

    def __init__(self, storage: Storage, cache_dir: Path) -> None:
        self.storage = storage
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.downloads = 0  # adapters fetched from storage (the rest came from the cache)

    def _lock(self, sha256: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sha256, threading.Lock())

    def cached(self, adapter: Adapter) -> bool:
        return (self.cache_dir / adapter.sha256 / PEFT_FILES[0]).is_file()

    def fetch(self, adapter: Adapter) -> Path:
        """The local folder of ``adapter``, downloaded and verified on first use."""
        if not all(c in "0123456789abcdef" for c in adapter.sha256) or len(adapter.sha256) != 64:
            raise AdapterCorrupt(f"adapter {adapter.id}: {adapter.sha256!r} is no sha256")
        final = self.cache_dir / adapter.sha256
        with self._lock(adapter.sha256):
            if (final / PEFT_FILES[0]).is_file():
                return final
            work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.cache_dir))
            try:
                folder = work / "adapter"
                folder.mkdir()
                if adapter.layout == "archive":
                    self._fetch_archive(adapter, work / "adapter.tar.gz", folder)
                elif adapter.layout == "folder":
                    self._fetch_folder(adapter, folder)
                else:
                    raise AdapterError(f"adapter {adapter.id}: unknown layout {adapter.layout!r}")
                missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
                if missing:
                    raise AdapterCorrupt(f"adapter {adapter.id} has no {missing[0]}")
                folder.rename(final)
                self.downloads += 1
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return final

    def _get(self, adapter: Adapter, key: str, dest: Path) -> None:
        try:
            self.storage.get_file(key, dest)
        except FileNotFoundError:
            raise AdapterMissing(
                f"adapter {adapter.id} is no longer in storage (was its job deleted?)"
            ) from None

    def _fetch_archive(self, adapter: Adapter, tarball: Path, folder: Path) -> None:
        self._get(adapter, adapter.key, tarball)
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

    def _fetch_folder(self, adapter: Adapter, folder: Path) -> None:
        prefix = adapter.key.rstrip("/") + "/"
        keys = self.storage.list(prefix)
        if not keys:
            raise AdapterMissing(f"checkpoint {adapter.id} is no longer in storage")
        for key in keys:
            name = key[len(prefix) :]
            if "/" in name or name.startswith("."):
                continue
            self._get(adapter, key, folder / name)
        if folder_digest(folder) != adapter.sha256:
            raise AdapterCorrupt(
                f"checkpoint {adapter.id} in storage does not match its recorded sha256"
            )
        for item in folder.iterdir():
            if item.name not in PEFT_FILES:
                item.unlink()
