"""Training rows prepared once per (dataset, tokenizer, settings) and shared by every rank.

Before this, every rank tokenised and packed the whole dataset itself, and again on every resumed
attempt. Now the first process to take ``<cache_dir>/<key>.lock`` (an exclusive ``flock``)
prepares the rows and writes them as ``.npy`` arrays into a temporary folder renamed to
``<cache_dir>/<key>/``; the others block on the lock, then find the folder and memory-map it, so
N ranks on one host share one copy in the page cache. A resumed attempt (or another job with the
same data, tokenizer and settings) that is given the same cache directory reuses the folder.

The key is the sha256 of: the dataset's sha256, the tokenizer's fingerprint (its full
serialisation, chat template and special token ids), ``max_seq_length``, ``packing``, the role
(training rows are packed, validation rows are not) and ``PREP_VERSION``, which changes whenever
the rendering, masking or packing code does. A folder is complete when its ``meta.json`` exists
(written last, inside the temporary folder, before the rename).

Waiting ranks are not inside a collective while they wait, so a long preparation never trips the
process group's timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.datasets import iter_examples, sha256_file
from worker.training import data as datamod

PREP_VERSION = 1
_ARRAYS = ("input_ids", "targets", "position_ids", "offsets", "label_tokens")
_OPTIONAL = ("sequence_ids",)  # preference pairs only
_META = "meta.json"


@dataclass
class PreparedRows:
    rows: datamod.RowSet
    stats: datamod.TokenizeStats
    key: str
    folder: Path
    reused: bool  # found complete in the cache (prepared by another rank or an earlier attempt)
    seconds: float  # this process's time to prepare or wait and load


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: the serialised tokenizer, its chat template, special ids."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary stands in for the serialisation
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for value in (
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ):
        digest.update(f"\x00{value!r}".encode())
    return digest.hexdigest()


def cache_key(
    dataset_sha256: str, tokenizer_fp: str, *, max_seq_length: int, packing: bool, role: str
) -> str:
    settings = {
        "dataset": dataset_sha256,
        "tokenizer": tokenizer_fp,
        "max_seq_length": max_seq_length,
        "packing": packing,
        "role": role,
        "version": PREP_VERSION,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{role}-{digest[:32]}"


LOCK_WAIT_SECONDS = 120.0


@contextlib.contextmanager
def _locked(path: Path, wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[bool]:
    """Hold ``path``'s exclusive lock; yields False when it could not be had in time.

    Why a bounded wait: the holder may be a stale attempt frozen mid-preparation (SIGSTOP, a
    paused VM) that keeps its lock until it thaws. After ``wait_seconds`` the caller prepares
    without the lock; ``_write``'s rename keeps concurrent writers from mixing their files.
    """
    deadline = time.monotonic() + wait_seconds
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _map(path: Path) -> np.ndarray:
    """Memory-mapped (the ranks of a host share the pages); an empty array cannot be mapped."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)


def _load(folder: Path) -> tuple[datamod.RowSet, datamod.TokenizeStats]:
    meta = json.loads((folder / _META).read_text())
    arrays = {name: _map(folder / f"{name}.npy") for name in _ARRAYS}
    for name in _OPTIONAL:
        if (folder / f"{name}.npy").exists():
            arrays[name] = _map(folder / f"{name}.npy")
    return datamod.RowSet(**arrays), datamod.TokenizeStats(**meta["stats"])


def _build(
    path: str, tokenizer: Any, max_seq_length: int, packing: bool
) -> tuple[datamod.RowSet, datamod.TokenizeStats]:
    with open(path, "rb") as stream:
        tokenized, stats = datamod.tokenize_examples(
            tokenizer, iter_examples(stream), max_seq_length
        )
    if packing:
        return datamod.pack(tokenized, datamod.row_capacity(tokenized, max_seq_length)), stats
    return datamod.unpacked_rows(tokenized), stats


def _write(folder: Path, rows: datamod.RowSet, meta: dict[str, Any]) -> None:
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in rows.arrays().items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
    (tmp / _META).write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:  # another host finished the same folder first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_rows(
    path: str,
    tokenizer: Any,
    *,
    max_seq_length: int,
    packing: bool,
    cache_dir: Path,
    role: str = "train",
    dataset_sha256: str | None = None,
) -> PreparedRows:
    """The rows of the JSONL file ``path``: from the cache, or prepared now and cached.

    Raises ``shared.datasets.DatasetError`` for an invalid file (nothing is cached then).
    """
    started = time.monotonic()
    dataset_sha256 = dataset_sha256 or sha256_file(path)
    key = cache_key(
        dataset_sha256,
        tokenizer_fingerprint(tokenizer),
        max_seq_length=max_seq_length,
        packing=packing,
        role=role,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = cache_dir / key
    reused = True
    if not (folder / _META).exists():
        with _locked(cache_dir / f"{key}.lock"):  # False after a bounded wait: build anyway
            if not (folder / _META).exists():
                reused = False
                rows, stats = _build(path, tokenizer, max_seq_length, packing)
                meta = {
                    "stats": asdict(stats),
                    "rows": len(rows),
                    "tokens": int(rows.real_tokens.sum()),
                    "dataset_sha256": dataset_sha256,
                    "max_seq_length": max_seq_length,
                    "packing": packing,
                    "role": role,
                    "version": PREP_VERSION,
                    "seconds": round(time.monotonic() - started, 3),
                }
                _write(folder, rows, meta)
    rows, stats = _load(folder)
    return PreparedRows(rows, stats, key, folder, reused, time.monotonic() - started)
