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


def model_fingerprint(model: str) -> dict[str, Any]:
    """Identify the base weights: the hub revision when known, else a hash of the local files'
    config and (name, size) list; hashing multi-GB weights on every job would cost minutes."""
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
            digest.update(f"{item.name}:{item.stat().st_size}".encode())
    return {
        "path": str(path),
        "model_type": config_data.get("model_type"),
        "revision": config_data.get("_commit_hash"),
        "fingerprint": digest.hexdigest(),
    }


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
