"""Dataset files: validated while they are read, stored whole, then recorded; listed, deleted.

Order matters: validate (nothing stored for a bad file) → put to storage under a fresh id →
insert the row. A crash between the last two leaves an orphan object, never a row pointing at
nothing. An owner uploading the same bytes again (same sha256 and purpose, e.g. a retried
``lorafleet submit``) gets the file already stored instead of a second copy.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import IO

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.datasets import PREFERENCE, DatasetError, Limits, summarize
from shared.errors import Conflict, InvalidInput, NotFound, TooLarge
from shared.ids import new_file_id
from shared.models import File, Job
from shared.services.paging import newest_first_page
from shared.spec import JobSpec
from shared.states import ACTIVE
from shared.storage import Storage

PURPOSES = ("fine-tune", "validation")


class _TeeReader:
    """Copies what the validator reads into a spool file and enforces the byte limit.

    Validation and spooling happen in one pass, so an oversized or invalid upload is refused as
    soon as the offending byte arrives.
    """

    def __init__(self, source: IO[bytes], sink: IO[bytes], max_bytes: int) -> None:
        self._source = source
        self._sink = sink
        self._max = max_bytes
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        if self.count > self._max:
            raise TooLarge(f"file is larger than the limit of {self._max} bytes", param="file")
        self._sink.write(data)
        return data


def clean_filename(filename: str | None) -> str:
    """The label kept for an uploaded file's name: its last path part, printable, bounded.

    The name is only ever shown back (the storage key derives from the id alone), but it is
    echoed in listings and headers, so path parts ("../../etc/passwd", "C:\\x\\y"), control
    characters (NUL cannot be stored by PostgreSQL, CR/LF would split a header) and lone surrogates
    go. Nothing left of it becomes "data.jsonl".
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
    name = name.strip().lstrip(".") or "data.jsonl"
    if len(name) > 512:
        raise InvalidInput("filename is longer than 512 characters", param="file")
    return name


def storage_key(file_id: str) -> str:
    """Where a file's bytes live in storage."""
    return f"files/{file_id}.jsonl"


def _request_hash(sha256: str, filename: str, purpose: str) -> str:
    return hashlib.sha256(f"{sha256}\0{filename}\0{purpose}".encode()).hexdigest()


def _by_idempotency_key(session: Session, owner: str, key: str) -> File | None:
    query = select(File).where(File.owner == owner, File.idempotency_key == key)
    return session.scalar(query.execution_options(populate_existing=True))


def _replay(existing: File, request_hash: str) -> File:
    if existing.request_hash != request_hash:
        raise Conflict(
            "Idempotency-Key was already used with a different file",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing


def create_file(
    session: Session,
    storage: Storage,
    owner: str,
    filename: str,
    stream: IO[bytes],
    purpose: str = "fine-tune",
    idempotency_key: str | None = None,
    limits: Limits | None = None,
    max_bytes: int | None = None,
) -> tuple[File, bool]:
    """Validate, store and record an uploaded JSONL dataset; returns (file, created).

    ``created`` is False when ``idempotency_key`` replays an earlier identical upload. Raises
    InvalidInput naming the line for bad data, TooLarge past ``max_bytes``, Conflict when the key
    was used for different content.
    """
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    filename = clean_filename(filename)
    limits = limits or Limits()
    limit = max_bytes if max_bytes is not None else limits.max_bytes

    with tempfile.TemporaryFile() as spool:
        try:
            summary = summarize(_TeeReader(stream, spool, limit), limits)  # type: ignore[arg-type]
        except DatasetError as exc:
            message = f"invalid dataset: {exc}"
            raise InvalidInput(message, param="file", code="invalid_file") from None
        request_hash = _request_hash(summary.sha256, filename, purpose)
        if idempotency_key:
            existing = _by_idempotency_key(session, owner, idempotency_key)
            if existing is not None:
                return _replay(existing, request_hash), False
        else:
            same = _same_content(session, owner, summary.sha256, purpose)
            if same is not None:
                return same, False

        file_id = new_file_id()
        key = storage_key(file_id)
        spool.seek(0)
        storage.put_stream(key, spool)

    row = File(
        id=file_id,
        owner=owner,
        filename=filename,
        purpose=purpose,
        bytes=summary.bytes,
        rows=summary.rows,
        format=summary.format,
        sha256=summary.sha256,
        storage_key=key,
        idempotency_key=idempotency_key or None,
        request_hash=request_hash,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the insert: answer as its replay.
        session.rollback()
        storage.delete(key)
        existing = _by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    return row, True


def _same_content(session: Session, owner: str, sha256: str, purpose: str) -> File | None:
    query = (
        select(File)
        .where(File.owner == owner, File.sha256 == sha256, File.purpose == purpose)
        .order_by(File.created_at, File.id)
        .limit(1)
    )
    return session.scalar(query.execution_options(populate_existing=True))


def get_file(session: Session, owner: str, file_id: str) -> File:
    """The owner's file; another owner's id is NotFound exactly like a missing one."""
    row = session.get(File, file_id)
    if row is None or row.owner != owner:
        raise NotFound(f"no file {file_id}", param="file_id")
    return row


def list_files(
    session: Session,
    owner: str,
    purpose: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> tuple[list[File], bool]:
    """A page of the owner's files, newest first; ``after`` is the last id of the previous page.

    Returns (files, has_more). The cursor is (created_at, id) in SQL, so a page costs the same
    whatever the owner holds.
    """
    query = select(File).where(File.owner == owner)
    if purpose:
        query = query.where(File.purpose == purpose)
    return newest_first_page(session, File, query, owner, after, limit, "file")


def delete_file(session: Session, storage: Storage, owner: str, file_id: str) -> File:
    """Delete the owner's file (row and bytes); Conflict while a queued or running job uses it.

    Final jobs that used the file keep its id (and their manifest keeps its sha256); cloning such
    a job later needs a new upload.
    """
    row = get_file(session, owner, file_id)
    users = session.scalars(
        select(Job.id)
        .where(
            Job.owner == owner,
            Job.status.in_([s.value for s in ACTIVE]),
            or_(Job.training_file == file_id, Job.validation_file == file_id),
        )
        .limit(3)
    ).all()
    if users:
        raise Conflict(
            f"file {file_id} is used by {', '.join(users)} (queued or running); cancel the job "
            "or wait until it ends, then delete the file",
            param="file_id",
            code="file_in_use",
        )
    session.delete(row)
    session.commit()
    storage.delete(row.storage_key)  # after the commit: a crash leaves bytes, never a dead row
    return row


def check_method_fits_file(spec: JobSpec, row: File | None, param: str) -> None:
    """DPO trains on preference pairs and only on them; refuse the other combinations now."""
    if row is None:
        return
    pairs = row.format == PREFERENCE
    if spec.method.is_dpo and not pairs:
        raise InvalidInput(
            f"{param} {row.id} holds {row.format} rows, but method.type 'dpo' trains on "
            "preference pairs ({'input', 'preferred_output', 'non_preferred_output'} or "
            "{'prompt', 'chosen', 'rejected'} rows); upload such a file or use method.type "
            "'supervised'",
            param=param,
            code="file_format_mismatch",
        )
    if pairs and not spec.method.is_dpo:
        raise InvalidInput(
            f"{param} {row.id} holds preference pairs, which method.type "
            f"{spec.method.type!r} cannot train on; set method to "
            '{"type": "dpo"} to train on them',
            param=param,
            code="file_format_mismatch",
        )
