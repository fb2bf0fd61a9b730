"""``/files`` over HTTP (TestClient) on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from shared.config import reset_settings
from tests.conftest import ALPACA_ROWS, CHAT_ROWS, COMPLETION_ROWS, TEXT_ROWS, jsonl


def _upload(client: Any, content: bytes, **kwargs: Any) -> Any:
    return client.post("/files", files={"file": ("train.jsonl", content)}, **kwargs)


@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        (CHAT_ROWS, "chat"),
        (COMPLETION_ROWS, "completion"),
        (ALPACA_ROWS, "alpaca"),
        (TEXT_ROWS, "text"),
    ],
)
def test_upload_each_format(client: Any, rows: list[dict[str, Any]], fmt: str) -> None:
    data = jsonl(rows)
    response = _upload(client, data, data={"purpose": "fine-tune"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["object"] == "file" and body["status"] == "processed"
    assert (body["format"], body["rows"], body["bytes"]) == (fmt, len(rows), len(data))
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["filename"] == "train.jsonl" and isinstance(body["created_at"], int)
    assert client.get(f"/files/{body['id']}").json() == body
    assert [f["id"] for f in client.get("/files").json()["data"]] == [body["id"]]


def test_bad_file_names_the_line(client: Any) -> None:
    data = jsonl(CHAT_ROWS[:3]) + b'{"messages": []}\n'
    response = _upload(client, data)
    assert response.status_code == 422
    body = response.json()
    assert "line 4" in body["detail"] and "line 4" in body["error"]["message"]
    assert body["error"]["param"] == "file"
    assert client.get("/files").json()["data"] == []


def test_upload_needs_a_file_part(client: Any) -> None:
    assert client.post("/files", data={"purpose": "fine-tune"}).status_code == 422
    assert client.post("/files", content=b"{}").status_code == 422
    # A malformed part header (found by the schema fuzzer) is the client's mistake, not a 500.
    boundary = "dbf290187f8dad8241c3fa4afd368b78"
    broken = client.post(
        "/files",
        content=f"--{boundary}\r\n-45964--{boundary}--\r\n".encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert broken.status_code == 422 and "malformed multipart" in broken.json()["detail"]


def test_too_large_is_413(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_MAX_UPLOAD_BYTES", "200")
    reset_settings()
    response = _upload(client, jsonl(TEXT_ROWS * 20))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"

    def chunked() -> Any:  # no Content-Length: the limit applies while streaming
        boundary = b"xyz"
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(50):
            yield b'{"text": "0123456789"}\n'
        yield b"\r\n--" + boundary + b"--\r\n"

    response = client.post(
        "/files",
        content=chunked(),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 413


def test_idempotent_upload(client: Any) -> None:
    data = jsonl(TEXT_ROWS)
    first = _upload(client, data, headers={"Idempotency-Key": "u1"})
    again = _upload(client, data, headers={"Idempotency-Key": "u1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = _upload(client, jsonl(CHAT_ROWS), headers={"Idempotency-Key": "u1"})
    assert other.status_code == 409


def test_identical_reupload_returns_the_stored_file(
    client: Any, bob_headers: dict[str, str]
) -> None:
    data = jsonl(CHAT_ROWS)
    first = _upload(client, data)
    again = client.post("/files", files={"file": ("renamed.jsonl", data)})
    assert first.status_code == 201 and again.status_code == 201, "the contract: 201 on success"
    assert again.json() == first.json(), "same owner, same bytes: the stored file, not a copy"
    assert len(client.get("/files").json()["data"]) == 1
    as_validation = _upload(client, data, data={"purpose": "validation"})
    assert as_validation.status_code == 201 and as_validation.json()["id"] != first.json()["id"]
    other_owner = client.post("/files", files={"file": ("t.jsonl", data)}, headers=bob_headers)
    assert other_owner.status_code == 201 and other_owner.json()["id"] != first.json()["id"]


def test_list_pages_in_sql_and_delete(client: Any, storage: Any) -> None:
    ids = [_upload(client, jsonl([{"text": f"doc {i}"}])).json()["id"] for i in range(5)]
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/files", params=params).json()
        seen += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1]
    assert client.get("/files", params={"after": "file-nope"}).status_code == 422

    gone = client.delete(f"/files/{ids[0]}")
    assert gone.status_code == 200 and gone.json()["id"] == ids[0]
    assert client.get(f"/files/{ids[0]}").status_code == 404
    assert not storage.exists(f"files/{ids[0]}.jsonl")
    assert client.delete(f"/files/{ids[0]}").status_code == 404

    body = {"base_model": "tiny", "training_file": ids[1], "training": {"max_steps": 2}}
    job = client.post("/jobs", json=body).json()
    busy = client.delete(f"/files/{ids[1]}")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "file_in_use"
    assert job["id"] in busy.json()["detail"]
    client.post(f"/jobs/{job['id']}/cancel")
    assert client.delete(f"/files/{ids[1]}").status_code == 200, "a final job no longer holds it"


def test_auth_and_other_owner(client: Any, bob_headers: dict[str, str]) -> None:
    file_id = _upload(client, jsonl(TEXT_ROWS)).json()["id"]
    assert client.get(f"/files/{file_id}", headers=bob_headers).status_code == 404
    assert client.get("/files/file-nope").status_code == 404
    anonymous = client.get("/files", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert client.get("/files", headers={"Authorization": "Bearer lf-wrong"}).status_code == 401
