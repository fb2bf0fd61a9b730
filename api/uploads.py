"""Receiving a dataset upload: multipart streamed to a spool file, then the files service.

Both ``POST /files`` and OpenAI's ``POST /v1/files`` take the same multipart body; parsing it is
HTTP work (so it lives in ``api``), storing and validating it is the service's
(``shared.services.files.create_file``). Starlette's form parser would first spool the whole body,
however large, before any limit could apply; this one stops at the first byte past the limit.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared.config import get_settings
from shared.datasets import Limits
from shared.errors import InvalidInput, TooLarge
from shared.models import File
from shared.services import files as file_service
from shared.storage import Storage

MAX_FIELD_BYTES = 4096
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file itself


class _MultipartUpload:
    """Streams the ``file`` part of a multipart body into ``sink``; small fields into memory."""

    def __init__(self, sink: IO[bytes], limit: int) -> None:
        self.sink = sink
        self.limit = limit
        self.file_bytes = 0
        self.filename: str | None = None
        self.fields: dict[str, bytearray] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._target: bytearray | None = None
        self._in_file = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._target = None
        self._in_file = False

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.filename is not None:
                raise InvalidInput("send exactly one 'file' part", param="file")
            self.filename = options.get(b"filename", b"data.jsonl").decode("utf-8", "replace")
            self._in_file = True
        else:
            self._target = self.fields.setdefault(name, bytearray())

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file:
            self.file_bytes += len(chunk)
            if self.file_bytes > self.limit:
                raise TooLarge(f"file is larger than the limit of {self.limit} bytes", param="file")
            self.sink.write(chunk)
        elif self._target is not None:
            self._target.extend(chunk)
            if len(self._target) > MAX_FIELD_BYTES:
                raise InvalidInput("form field too long", param="purpose")

    def field(self, name: str) -> str | None:
        value = self.fields.get(name)
        return value.decode("utf-8", "replace").strip() if value is not None else None


async def _receive(request: Request, sink: IO[bytes], limit: int) -> _MultipartUpload:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidInput("send multipart/form-data with the dataset in field 'file'", "file")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise TooLarge(f"file is larger than the limit of {limit} bytes", param="file")
    upload = _MultipartUpload(sink, limit)
    parser = MultipartParser(params[b"boundary"], upload.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput(f"malformed multipart body: {exc}", param="file") from None
    if upload.filename is None:
        raise InvalidInput("no 'file' part in the upload", param="file")
    return upload


async def upload_dataset(
    request: Request,
    owner: str,
    session: Session,
    storage: Storage,
    idempotency_key: str | None,
) -> tuple[File, bool]:
    """Stream the request's ``file`` part to a spool file and hand it to ``create_file``.

    Returns (file, created): created is False for an idempotent replay or an identical
    re-upload by the same owner.
    """
    settings = get_settings()
    limits = Limits(max_rows=settings.max_rows, max_line_bytes=settings.max_line_bytes)
    with tempfile.TemporaryFile() as spool:
        upload = await _receive(request, spool, settings.max_upload_bytes)
        spool.seek(0)
        return await run_in_threadpool(
            file_service.create_file,
            session,
            storage,
            owner,
            upload.filename or "data.jsonl",
            spool,
            upload.field("purpose") or "fine-tune",
            idempotency_key,
            limits,
            settings.max_upload_bytes,
        )


MULTIPART_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "The JSONL dataset: one example a line (chat `messages`, "
                        "`prompt`/`completion`, `instruction`/`input`/`output` or `text`).",
                    },
                    "purpose": {
                        "type": "string",
                        "enum": list(file_service.PURPOSES),
                        "default": "fine-tune",
                        "description": "`fine-tune` (training) or `validation` (eval loss).",
                    },
                },
            },
            "encoding": {"file": {"contentType": "application/jsonl, application/octet-stream"}},
        }
    },
}
"""The upload's request body for the OpenAPI document (Swagger UI shows a file picker)."""
