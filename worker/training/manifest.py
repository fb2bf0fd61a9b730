"""``manifest.json`` beside the adapter: what was trained from what, and the files' checksums.

Written last, after every adapter file is in place, so its presence marks a complete adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.datasets import sha256_file

MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("lorafleet", "torch", "transformers", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


FINGERPRINT_BLOCKS = 64  # sampled per weight file
FINGERPRINT_BLOCK_BYTES = 4096


def model_fingerprint(model: str) -> dict[str, Any]:
    """Identify the base weights: the hub revision when known, and a hash of the local files'
    config, (name, size) list and sampled content: the first and last 4 KiB of every weight file
    and evenly spaced blocks between (256 KiB per file in all). Hashing multi-GB weights whole
    on every job would cost minutes; the samples still tell apart two models of one
    architecture (a base and its instruct variant have the same names and sizes, not the same
    bytes)."""
    path = Path(model)
    if not path.is_dir():
        return {"path": model, "revision": None, "fingerprint": None}
    digest = hashlib.sha256()
    config = path / "config.json"
    config_data: dict[str, Any] = {}
    if config.exists():
        raw = config.read_bytes()
        digest.update(raw)
        config_data = json.loads(raw)
    for item in sorted(path.iterdir()):
        if item.suffix in {".safetensors", ".bin"}:
            size = item.stat().st_size
            digest.update(f"{item.name}:{size}".encode())
            _sample_into(digest, item, size)
    return {
        "path": str(path),
        "model_type": config_data.get("model_type"),
        "revision": config_data.get("_commit_hash"),
        "fingerprint": digest.hexdigest(),
    }


def _sample_into(digest: Any, item: Path, size: int) -> None:
    span = max(0, size - FINGERPRINT_BLOCK_BYTES)
    offsets = sorted({span * i // (FINGERPRINT_BLOCKS - 1) for i in range(FINGERPRINT_BLOCKS)})
    with open(item, "rb") as stream:
        for offset in offsets:
            stream.seek(offset)
            digest.update(stream.read(FINGERPRINT_BLOCK_BYTES))


def write_manifest(out_dir: Path, fields: dict[str, Any]) -> dict[str, Any]:
    files = {
        item.name: sha256_file(str(item))
        for item in sorted(out_dir.iterdir())
        if item.is_file() and item.name != MANIFEST and not item.name.startswith(".")
    }
    manifest = {"files": files, **fields, "versions": library_versions()}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def verify_manifest(out_dir: Path) -> list[str]:
    """Names of files whose sha256 differs from the manifest (empty = all good)."""
    manifest = json.loads((out_dir / MANIFEST).read_text())
    return [
        name
        for name, digest in manifest["files"].items()
        if not (out_dir / name).exists() or sha256_file(str(out_dir / name)) != digest
    ]
