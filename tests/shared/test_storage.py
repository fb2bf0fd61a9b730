"""Storage backends: LocalStorage fully; S3Storage against moto's real HTTP server."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.storage import LocalStorage, S3Storage, Storage, storage_from_url

# Module-scoped servers: keep this file on one xdist worker.
pytestmark = pytest.mark.xdist_group(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"b{tmp_path.name.lower().replace('_', '-')[-40:]}"
    s3 = S3Storage(bucket, "pre/fix", endpoint_url=endpoint)
    s3.client.create_bucket(Bucket=bucket)
    return s3


def test_roundtrip(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 1000)
    assert store.put_file("a/b/c.bin", source) == 1000
    assert store.put_stream("a/d.bin", io.BytesIO(b"hello")) == 5
    assert store.exists("a/b/c.bin") and not store.exists("a/nope")
    assert store.size("a/d.bin") == 5
    assert b"".join(store.open_stream("a/d.bin", chunk_size=2)) == b"hello"
    out = tmp_path / "out" / "c.bin"
    store.get_file("a/b/c.bin", out)
    assert out.read_bytes() == b"x" * 1000
    assert store.list("a/") == ["a/b/c.bin", "a/d.bin"]
    assert store.list("a/b") == ["a/b/c.bin"]
    store.delete("a/d.bin")
    store.delete("a/d.bin")  # missing is fine
    assert store.list() == ["a/b/c.bin"]


def test_missing_keys_raise_file_not_found(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.size("none")
    with pytest.raises(FileNotFoundError):
        store.open_stream("none")
    with pytest.raises(FileNotFoundError):
        store.get_file("none", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["../evil", "/abs", "a/../../b", "", "a//b", "a\\b", ".tmp-x"])
def test_bad_keys_refused(store: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_stream(key, io.BytesIO(b"x"))


def test_s3_multipart_and_presigned(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = storage_from_url("s3://multi/p", endpoint_url=moto_endpoint)
    assert isinstance(store, S3Storage)
    store.client.create_bucket(Bucket="multi")
    data = bytes(range(256)) * (40 * 1024 * 4)  # 40 MiB: above boto3's 8 MiB multipart threshold
    assert store.put_stream("big.bin", io.BytesIO(data)) == len(data)
    assert store.size("big.bin") == len(data)
    url = store.presigned_url("big.bin", 60)
    assert url is not None
    assert httpx.get(url).content[:1024] == data[:1024]


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)

    class Exploding(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(4)

    store.put_stream("k", io.BytesIO(b"old"))
    with pytest.raises(OSError):
        store.put_stream("k", Exploding(b"new content"))
    assert b"".join(store.open_stream("k")) == b"old"  # nobody sees half a file
    assert store.list() == ["k"]
    assert [p.name for p in tmp_path.iterdir()] == ["k"]
    assert LocalStorage(tmp_path).presigned_url("k") is None


def test_storage_from_url(tmp_path: Path) -> None:
    local = storage_from_url(f"file://{tmp_path}/s")
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "s").resolve()
    with pytest.raises(ValueError):
        storage_from_url("ftp://x/y")
