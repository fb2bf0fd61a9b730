"""The adapter cache: what storage holds is checked before anything loads it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from shared.inference_shapes import GenerationParams
from shared.services.adapters import Adapter
from shared.storage import LocalStorage
from worker.adapter_files import AdapterCorrupt, AdapterMissing, folder_digest, make_adapter_tarball
from worker.inference.adapters import AdapterStore
from worker.inference.engine import Engine, Request, Sink
from worker.training.manifest import write_manifest


def _peft_folder(root: Path, weights: bytes = b"weights" * 100) -> Path:
    folder = root / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    write_manifest(folder, {"steps": 1})
    return folder


def _stored(storage: LocalStorage, root: Path, name: str, size: int = 1000) -> Adapter:
    """A job's adapter in storage, ``size`` bytes of weights unique to ``name``."""
    weights = (name.encode() * size)[:size]
    sha, _ = make_adapter_tarball(_peft_folder(root / name, weights), root / f"{name}.tar.gz")
    storage.put_file(f"jobs/{name}/adapter.tar.gz", root / f"{name}.tar.gz")
    return Adapter(name, f"jobs/{name}/adapter.tar.gz", sha, "archive")


def _cached(store: AdapterStore, *adapters: Adapter) -> list[str]:
    """Which of ``adapters`` the cache holds (their ids)."""
    return [a.id for a in adapters if store.cached(a)]


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


def test_cache_evicts_the_least_recently_used_but_never_one_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    a = [_stored(storage, tmp_path / "src", f"a{i}") for i in range(6)]
    probe = AdapterStore(storage, tmp_path / "probe")
    probe.fetch(a[0])
    one, _ = probe.usage()  # the bytes one cached adapter takes (all are the same size)
    engine = Engine(memory_bytes=1 << 30)  # not started: what it is given stays queued
    store = AdapterStore(storage, tmp_path / "cache", max_bytes=3 * one, in_use=engine.in_use)

    for adapter in a[:3]:
        store.fetch(adapter)
    store.fetch(a[0])  # from the cache, and now the most recently used
    assert store.usage() == (3 * one, 3) and store.downloads == 3
    store.fetch(a[3])
    assert _cached(store, *a) == ["a0", "a2", "a3"]  # a1 was the least recently used

    # The engine holds a2 (a queued request), a request pins a0, a3 is used last: a4 arrives.
    params = GenerationParams(max_tokens=1, temperature=0, top_p=1)
    engine.submit(Request("tiny", "tiny", [1], params, Sink(), "a2", store.fetch(a[2])))
    with store.use(a[0]) as pinned:
        store.fetch(a[3])  # order now: a2 (held), a0 (pinned), a3
        store.fetch(a[4])
        assert _cached(store, *a) == ["a0", "a2", "a4"]  # a3 went, not the older a0 or a2
        assert (pinned / "adapter_model.safetensors").is_file()
    assert store.usage() == (3 * one, 3) and store.evictions == 2

    # An evicted adapter comes back: downloaded again and checked again.
    downloads = store.downloads
    local = store.fetch(a[1])
    assert store.downloads == downloads + 1
    assert (local / "adapter_model.safetensors").read_bytes() == (b"a1" * 1000)[:1000]
    assert _cached(store, *a) == ["a1", "a2", "a4"]  # a0's pin is gone: it was the oldest
    storage.put_file("jobs/a3/adapter.tar.gz", tmp_path / "src" / "a4.tar.gz")  # other bytes
    with pytest.raises(AdapterCorrupt, match="sha256"):
        store.fetch(a[3])

    # Larger than the whole bound: served, and kept until the next adapter arrives.
    big = _stored(storage, tmp_path / "src", "big", size=4 * one)
    with caplog.at_level(logging.WARNING, logger="lorafleet.inference"):
        assert (store.fetch(big) / "adapter_model.safetensors").stat().st_size == 4 * one
    assert "alone takes" in caplog.text
    assert _cached(store, *a, big) == ["a2", "big"]  # everything not in use made room
    store.fetch(a[5])
    assert _cached(store, *a, big) == ["a2", "a5"]


def test_recency_survives_a_restart_and_deletes_are_never_half_seen(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    a = [_stored(storage, tmp_path / "src", f"a{i}") for i in range(4)]
    first = AdapterStore(storage, tmp_path / "cache")  # unbounded
    for adapter in [a[0], a[1], a[2], a[0]]:
        first.fetch(adapter)
    one = first.usage()[0] // 3

    # A crash in the middle of a delete leaves a tombstone, which the next start removes; a
    # folder under a sha256 name missing a file (not written by the store) is fetched again.
    tomb = tmp_path / "cache" / f".evict-{a[3].sha256}-dead"
    tomb.mkdir()
    (tomb / "adapter_config.json").write_text("{}")
    half = tmp_path / "cache" / a[3].sha256
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")

    second = AdapterStore(storage, tmp_path / "cache", max_bytes=3 * one)
    assert not tomb.exists()
    local = second.fetch(a[3])
    assert second.downloads == 1
    assert (local / "adapter_model.safetensors").read_bytes() == (b"a3" * 1000)[:1000]
    assert _cached(second, *a) == ["a0", "a2", "a3"]  # a1, not a0 (fetched first, used last)
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
