"""Object storage behind one small interface: a local folder (default) or S3/MinIO.

Datasets, checkpoints and adapters are written here. Both backends make an object appear whole or
not at all: LocalStorage writes a temporary name in the same folder and ``os.replace``s it; S3
only shows an object once its (multipart) upload completed. Missing keys raise
``FileNotFoundError`` from every backend.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root or collide with temporary names."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") or part.startswith(_TMP_PREFIX) for part in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _atomic_local_copy(source: IO[bytes], dest: Path) -> int:
    """Copy a stream to ``dest`` through a temporary sibling; returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return written


@runtime_checkable
class Storage(Protocol):
    """What the services and the worker need from object storage."""

    def put_file(self, key: str, local_path: str | Path) -> int:
        """Upload a local file; returns its size."""
        ...

    def put_stream(self, key: str, fileobj: IO[bytes]) -> int:
        """Upload everything readable from ``fileobj``; returns the bytes written."""
        ...

    def get_file(self, key: str, local_path: str | Path) -> None:
        """Download to ``local_path`` (written whole or not at all)."""
        ...

    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Iterate the object's bytes in chunks (for streaming HTTP responses)."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
        ...

    def size(self, key: str) -> int: ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited direct download URL, or None where the backend has none."""
        ...


class LocalStorage:
    """Objects as files under ``root``; keys are relative POSIX paths."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file holding ``key`` (validated to stay under the root)."""
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put_file(self, key: str, local_path: str | Path) -> int:
        with open(local_path, "rb") as source:
            return _atomic_local_copy(source, self.path(key))

    def put_stream(self, key: str, fileobj: IO[bytes]) -> int:
        return _atomic_local_copy(fileobj, self.path(key))

    def get_file(self, key: str, local_path: str | Path) -> None:
        with open(self._existing(key), "rb") as source:
            _atomic_local_copy(source, Path(local_path))

    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        # Open now so a missing key fails at the call, not at the first chunk.
        handle = open(self._existing(key), "rb")  # noqa: SIM115 - closed by the generator

        def chunks() -> Iterator[bytes]:
            with handle:
                yield from iter(lambda: handle.read(chunk_size), b"")

        return chunks()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        with suppress(FileNotFoundError):
            self.path(key).unlink()

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None

    def _existing(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path


class _CountingReader:
    """Counts bytes as boto3 reads them, so put_stream can report the size it uploaded."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._fileobj = fileobj
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fileobj.read(size)
        self.count += len(data)
        return data


class S3Storage:
    """Objects in ``s3://bucket/prefix`` (AWS, MinIO, moto); boto3 handles multipart."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client: Any | None = None,
    ) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def __repr__(self) -> str:
        return f"S3Storage({self.bucket!r}, {self.prefix!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, local_path: str | Path) -> int:
        self.client.upload_file(str(local_path), self.bucket, self._key(key))
        return os.path.getsize(local_path)

    def put_stream(self, key: str, fileobj: IO[bytes]) -> int:
        reader = _CountingReader(fileobj)
        self.client.upload_fileobj(reader, self.bucket, self._key(key))
        return reader.count

    def get_file(self, key: str, local_path: str | Path) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
        os.close(fd)
        try:
            self._call(self.client.download_file, self.bucket, self._key(key), tmp)
            os.replace(tmp, dest)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def open_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        body = response["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return chunks()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        # A prefix is only a filter (it need not be a whole key), so it is not check_key'd.
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def size(self, key: str) -> int:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return str(
            self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=expires_s,
            )
        )

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call boto3, turning "no such key" into FileNotFoundError like LocalStorage."""
        from botocore.exceptions import ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(kwargs.get("Key") or args[1]) from None
            raise


def storage_from_url(url: str, endpoint_url: str | None = None) -> Storage:
    """``file:///abs/path`` (or a bare path) → LocalStorage; ``s3://bucket/prefix`` → S3Storage."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path if parsed.scheme else url)
        if parsed.netloc and parsed.netloc != "localhost":
            raise ValueError(f"file URLs name no host: {url!r}")
        return LocalStorage(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL without a bucket: {url!r}")
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    raise ValueError(f"unsupported storage URL {url!r} (use file:///path or s3://bucket/prefix)")


def copy_between(source: Storage, key: str, dest: Storage, dest_key: str | None = None) -> None:
    """Copy one object across backends through a local temporary file."""
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, "object")
        source.get_file(key, local)
        dest.put_file(dest_key or key, local)


__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "check_key",
    "copy_between",
    "storage_from_url",
]


def storage_from_settings(settings: Any) -> Storage:
    """The storage the settings name (``storage_url`` + ``s3_endpoint_url``)."""
    return storage_from_url(settings.storage_url, settings.s3_endpoint_url)
