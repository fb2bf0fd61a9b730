"""The adapter cache: what storage holds is checked before anything loads it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from shared.services.inference import Adapter
from shared.storage import LocalStorage
from worker.inference.adapters import AdapterCorrupt, AdapterMissing, AdapterStore
from worker.job_runner import folder_digest, make_adapter_tarball
from worker.training.manifest import write_manifest


def _peft_folder(root: Path) -> Path:
    folder = root / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    write_manifest(folder, {"steps": 1})
    return folder


def _tarball(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_archive_is_checked_against_the_job_sha_and_the_manifest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    store = AdapterStore(storage, tmp_path / "cache")
    folder = _peft_folder(tmp_path / "src")
    sha, _ = make_adapter_tarball(folder, tmp_path / "a.tar.gz")
    storage.put_file("jobs/a/adapter.tar.gz", tmp_path / "a.tar.gz")
    good = Adapter("a", "jobs/a/adapter.tar.gz", sha, "archive")
    local = store.fetch(good)
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    assert store.fetch(good) == local and store.downloads == 1  # the second time, from the cache

    with pytest.raises(AdapterCorrupt, match="sha256"):
        store.fetch(Adapter("a", "jobs/a/adapter.tar.gz", "0" * 64, "archive"))

    # A tarball whose recorded sha256 matches, but whose weights are not the manifest's.
    manifest = (folder / "manifest.json").read_bytes()
    tampered = _tarball(
        {
            "adapter/adapter_config.json": (folder / "adapter_config.json").read_bytes(),
            "adapter/adapter_model.safetensors": b"other weights",
            "adapter/manifest.json": manifest,
            "../escape.txt": b"never written",  # members outside adapter/ are ignored
        }
    )
    storage.put_stream("jobs/b/adapter.tar.gz", io.BytesIO(tampered))
    digest = hashlib.sha256(tampered).hexdigest()
    with pytest.raises(AdapterCorrupt, match="manifest"):
        store.fetch(Adapter("b", "jobs/b/adapter.tar.gz", digest, "archive"))
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "cache" / digest).exists()  # nothing half-checked stays cached

    with pytest.raises(AdapterMissing):
        store.fetch(Adapter("c", "jobs/c/adapter.tar.gz", "1" * 64, "archive"))


def test_checkpoint_folder_is_checked_against_its_digest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    store = AdapterStore(storage, tmp_path / "cache")
    folder = _peft_folder(tmp_path / "src")
    (folder / "manifest.json").unlink()
    (folder / "trainer_state.pt").write_bytes(b"optimizer")
    digest = folder_digest(folder)
    for item in folder.iterdir():
        storage.put_file(f"jobs/a/checkpoints/step_2-e1/{item.name}", item)
    ckpt = Adapter("a-step-2", "jobs/a/checkpoints/step_2-e1/", digest, "folder")
    local = store.fetch(ckpt)
    assert sorted(p.name for p in local.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # the optimizer state served the check only
    storage.put_stream("jobs/a/checkpoints/step_3-e1/adapter_config.json", io.BytesIO(b"{}"))
    with pytest.raises(AdapterCorrupt):
        store.fetch(Adapter("a-step-3", "jobs/a/checkpoints/step_3-e1/", "2" * 64, "folder"))
    with pytest.raises(AdapterMissing):
        store.fetch(Adapter("a-step-9", "jobs/a/checkpoints/step_9-e1/", "3" * 64, "folder"))
