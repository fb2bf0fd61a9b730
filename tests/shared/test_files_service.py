"""Dataset files through the real service, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.datasets import Limits
from shared.errors import Conflict, InvalidInput, NotFound, TooLarge
from shared.services.files import create_file, get_file, list_files
from shared.storage import Storage
from tests.conftest import ALPACA_ROWS, CHAT_ROWS, COMPLETION_ROWS, TEXT_ROWS, jsonl


@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        (CHAT_ROWS, "chat"),
        (COMPLETION_ROWS, "completion"),
        (ALPACA_ROWS, "alpaca"),
        (TEXT_ROWS, "text"),
    ],
)
def test_each_format(
    session: Session, storage: Storage, rows: list[dict[str, Any]], fmt: str
) -> None:
    data = jsonl(rows)
    row, created = create_file(session, storage, "alice", "d.jsonl", io.BytesIO(data))
    assert created and row.id.startswith("file-") and len(row.id) == 5 + 24
    assert (row.format, row.rows, row.bytes) == (fmt, len(rows), len(data))
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert b"".join(storage.open_stream(row.storage_key)) == data
    assert row.storage_key == f"files/{row.id}.jsonl"


def test_bad_line_names_it_and_stores_nothing(session: Session, storage: Storage) -> None:
    data = jsonl(CHAT_ROWS[:2]) + b"{not json\n"
    with pytest.raises(InvalidInput, match="line 3"):
        create_file(session, storage, "alice", "d.jsonl", io.BytesIO(data))
    assert storage.list("files/") == []
    assert list_files(session, "alice") == ([], False)


def test_too_large(session: Session, storage: Storage) -> None:
    data = jsonl(TEXT_ROWS * 50)
    with pytest.raises(TooLarge):
        create_file(
            session, storage, "alice", "d.jsonl", io.BytesIO(data), limits=Limits(), max_bytes=100
        )
    assert storage.list() == []


def test_idempotency(session: Session, storage: Storage) -> None:
    data = jsonl(TEXT_ROWS)
    first, created = create_file(
        session, storage, "alice", "d.jsonl", io.BytesIO(data), idempotency_key="k1"
    )
    again, created_again = create_file(
        session, storage, "alice", "d.jsonl", io.BytesIO(data), idempotency_key="k1"
    )
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict):
        create_file(
            session, storage, "alice", "d.jsonl", io.BytesIO(jsonl(CHAT_ROWS)), idempotency_key="k1"
        )
    # keys are per owner
    other, created_other = create_file(
        session, storage, "bob", "d.jsonl", io.BytesIO(data), idempotency_key="k1"
    )
    assert created_other and other.id != first.id
    assert len(storage.list("files/")) == 2


def test_owner_isolation(session: Session, storage: Storage) -> None:
    row, _ = create_file(session, storage, "alice", "d.jsonl", io.BytesIO(jsonl(TEXT_ROWS)))
    assert get_file(session, "alice", row.id).id == row.id
    with pytest.raises(NotFound) as other:
        get_file(session, "bob", row.id)
    with pytest.raises(NotFound) as missing:
        get_file(session, "bob", "file-000000000000000000000000")
    assert str(other.value).replace(row.id, "X") == str(missing.value).replace(
        "file-000000000000000000000000", "X"
    )
    assert [f.id for f in list_files(session, "alice")[0]] == [row.id]
    assert list_files(session, "bob") == ([], False)


def test_bad_purpose(session: Session, storage: Storage) -> None:
    with pytest.raises(InvalidInput) as exc:
        create_file(session, storage, "a", "d", io.BytesIO(jsonl(TEXT_ROWS)), purpose="x")
    assert exc.value.param == "purpose"
