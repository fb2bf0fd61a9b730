"""Adapters from object storage into a local cache, each checked before anything loads it.

The cache is content-addressed: ``<cache>/<sha256>/`` holds the peft files of the adapter whose
recorded checksum is ``sha256``, so a folder that exists was verified when it was written (it is
assembled in a temporary folder and renamed into place; ``worker.adapter_files.download_adapter``
does the download and the check, one per storage layout).

A mismatch is :class:`AdapterCorrupt` (nothing is cached, the next request tries again); an
adapter gone from storage is :class:`AdapterMissing`.

The cache is bounded (``max_bytes``, ``LORAFLEET_INFERENCE_ADAPTER_CACHE_BYTES``): adding an
adapter evicts the least recently used folders until the total fits again. Recency is the
folder's mtime, touched on every fetch, so a restarted server keeps the order at the cost of one
``utime``. A folder leaves by a rename to ``.evict-*`` (atomic) before it is deleted, so a crash
mid-delete leaves a tombstone (removed at the next start), never a half folder under its sha256.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.services.adapters import Adapter
from shared.storage import Storage
from worker.adapter_files import (
    PEFT_FILES,
    AdapterCorrupt,
    download_adapter,
)

SHA256 = re.compile(r"[0-9a-f]{64}")
TOMBSTONE = ".evict-"  # a folder being deleted; never read again

log = logging.getLogger("lorafleet.inference")


class AdapterStore:
    """Fetches and verifies adapters, within a disk bound; safe to call from many threads at once.

    Which folders may not be evicted is known to two parties, so each tells what it knows,
    rather than the store tracking request lifetimes it cannot see the end of:

    - :meth:`use` pins an adapter from before its fetch until the caller's ``with`` ends. The
      server holds it until the engine has the request queued (a context manager: no error path
      leaks a pin, which would keep a folder forever).
    - ``in_use`` (the engine's :meth:`~worker.inference.engine.Engine.in_use`) names the folders
      the engine still needs: queued requests, requests being attached, attached adapters.

    The two overlap (the server submits inside ``use``), so a folder is never unclaimed between
    its fetch and its attach. Both are consulted under the store's lock when choosing victims.
    Another process sharing the folder (``--scale inference=N`` on one volume) is not asked: it
    can lose a folder it has just fetched only when everything older is in use, and then the
    request fails and the next one fetches it again.
    """

    def __init__(
        self,
        storage: Storage,
        cache_dir: Path,
        max_bytes: int | None = None,
        in_use: Callable[[], Iterable[Path]] | None = None,
    ) -> None:
        self.storage = storage
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes  # None: unbounded
        self.in_use = in_use or (lambda: ())
        cache_dir.mkdir(parents=True, exist_ok=True)
        for leftover in cache_dir.glob(TOMBSTONE + "*"):  # deletions a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        self._locks: dict[str, threading.Lock] = {}
        self._pins: Counter[str] = Counter()
        self._guard = threading.Lock()
        self._clock = 0  # the last mtime written (ns)
        self.downloads = 0  # adapters fetched from storage (the rest came from the cache)
        self.evictions = 0  # adapter folders deleted to keep the bound

    def _lock(self, sha256: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sha256, threading.Lock())

    def cached(self, adapter: Adapter) -> bool:
        return _complete(self.cache_dir / adapter.sha256)

    @contextmanager
    def use(self, adapter: Adapter) -> Iterator[Path]:
        """The adapter's local folder (as :meth:`fetch`), not evicted until the block ends."""
        with self._guard:
            self._pins[adapter.sha256] += 1
        try:
            yield self.fetch(adapter)
        finally:
            with self._guard:
                self._pins[adapter.sha256] -= 1
                if not self._pins[adapter.sha256]:
                    del self._pins[adapter.sha256]

    def usage(self) -> tuple[int, int]:
        """Bytes and number of the adapters in the cache."""
        entries = self._entries()
        return sum(size for _, size, _ in entries), len(entries)

    def fetch(self, adapter: Adapter) -> Path:
        """The local folder of ``adapter``, downloaded and verified on first use.

        Without :meth:`use` around it, nothing stops another thread's fetch from evicting the
        folder once this one returns (unless the engine holds it).
        """
        if not SHA256.fullmatch(adapter.sha256):
            raise AdapterCorrupt(f"adapter {adapter.id}: {adapter.sha256!r} is no sha256")
        final = self.cache_dir / adapter.sha256
        with self._lock(adapter.sha256):
            if _complete(final):
                self._touch(final)
                return final
            if final.exists():  # not written by this code (renames are whole): never trust it
                tomb = self._bury(final)
                if tomb is not None:
                    shutil.rmtree(tomb, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.cache_dir))
            try:
                folder = work / "adapter"
                folder.mkdir()
                download_adapter(self.storage, adapter, folder, work)
                folder.rename(final)
                self._touch(final)
                self.downloads += 1
            finally:
                shutil.rmtree(work, ignore_errors=True)
            self._evict(adapter)
        return final

    def _touch(self, folder: Path) -> None:
        """Mark ``folder`` the most recently used: its mtime, strictly after the last one this
        store wrote (two fetches within the clock's resolution keep their order)."""
        with self._guard:
            self._clock = max(time.time_ns(), self._clock + 1)
            os.utime(folder, ns=(self._clock, self._clock))

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, sha256) of every cached adapter."""
        entries = []
        for item in os.scandir(self.cache_dir):
            if not SHA256.fullmatch(item.name):
                continue  # fetches in progress, tombstones
            try:
                mtime = item.stat().st_mtime
                size = sum(f.stat().st_size for f in os.scandir(item.path) if f.is_file())
            except FileNotFoundError:  # evicted meanwhile (by another process)
                continue
            entries.append((mtime, size, item.name))
        return entries

    def _bury(self, folder: Path) -> Path | None:
        """Rename ``folder`` to a tombstone, atomically out of the cache (the caller deletes the
        tombstone); None if the folder is gone already."""
        tomb = self.cache_dir / f"{TOMBSTONE}{folder.name}-{os.urandom(4).hex()}"
        try:
            folder.rename(tomb)
        except FileNotFoundError:
            return None
        return tomb

    def _evict(self, added: Adapter) -> None:
        """Evict the least recently used adapters until the cache fits ``max_bytes``; never
        ``added``, a pinned one, one the engine holds, or one another thread is fetching."""
        if self.max_bytes is None:
            return
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        tombs: list[Path] = []
        with self._guard:  # no pin can be taken while victims are chosen
            keep = {added.sha256, *self._pins, *(Path(p).name for p in self.in_use())}
            for _, size, name in entries:
                if total <= self.max_bytes:
                    break
                lock = self._locks.get(name)
                if name in keep or (lock is not None and not lock.acquire(blocking=False)):
                    continue  # in use, or being fetched by an unpinned caller
                try:
                    tomb = self._bury(self.cache_dir / name)
                finally:
                    if lock is not None:
                        lock.release()
                total -= size
                if tomb is not None:
                    tombs.append(tomb)
                    self.evictions += 1
                    log.info("evicting adapter %s from the cache (%d bytes)", name, size)
        for tomb in tombs:  # outside the lock: deleting takes a while, nobody reads tombstones
            shutil.rmtree(tomb, ignore_errors=True)
        if total > self.max_bytes:
            own = next((size for _, size, name in entries if name == added.sha256), 0)
            log.warning(
                "adapter cache holds %d bytes, above LORAFLEET_INFERENCE_ADAPTER_CACHE_BYTES "
                "(%d): %s",
                total,
                self.max_bytes,
                f"adapter {added.id} alone takes {own} bytes (served, kept until the next eviction)"
                if own > self.max_bytes
                else "the rest is in use",
            )


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file peft loads (any folder under a sha256 name was renamed
    there whole after its check, so this is only a guard against hand-made ones)."""
    return all((folder / name).is_file() for name in PEFT_FILES)
