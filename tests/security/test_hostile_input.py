"""Hostile input: datasets, names and ids built to crash, escape or fill the server.

Each rejected request must answer 4xx naming the problem, and leave nothing behind: no object in
storage (temporary names included), no row in the database. Runs on SQLite and PostgreSQL, where
NUL characters and lone surrogates used to turn lookups into 500s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared.config import Settings, reset_settings
from shared.db import session_factory
from shared.models import File, Job
from tests.conftest import CHAT_ROWS, TEXT_ROWS, jsonl
from tests.security.conftest import Tenants

Snapshot = Callable[[], tuple[list[str], int]]
BOUNDARY = "hostile-boundary"


def multipart(payload: Iterator[bytes], filename: bytes = b"data.jsonl") -> Iterator[bytes]:
    """A streamed multipart body (the test never holds a large upload in memory either)."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + filename
        + b'"\r\nContent-Type: application/jsonl\r\n\r\n'
    )
    yield from payload
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_stream(
    client: TestClient, payload: Iterator[bytes], filename: bytes = b"d.jsonl"
) -> Any:
    return client.post(
        "/files",
        content=multipart(payload, filename),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


def all_files_under(root: Path) -> list[str]:
    """Every file below ``root``, temporary ones included (Storage.list hides those)."""
    return sorted(str(Path(d, n)) for d, _, names in os.walk(root) for n in names)


def big_line(size: int) -> Iterator[bytes]:
    yield b'{"text": "'
    chunk = b"a" * (1 << 20)
    for _ in range(size >> 20):
        yield chunk
    yield b'"}\n'


def tiny_rows(n: int) -> Iterator[bytes]:
    row = b'{"text": "row"}\n'
    batch = row * 10_000
    for _ in range(n // 10_000):
        yield batch


HOSTILE_DATASETS: dict[str, tuple[Callable[[], Iterator[bytes]], str]] = {
    "invalid utf-8": (lambda: iter([jsonl(TEXT_ROWS), b'{"text": "caf\xe9 \xff"}\n']), "line 4"),
    "nul byte": (lambda: iter([jsonl(TEXT_ROWS[:1]), b'{"text": "a\x00b"}\n']), "line 2"),
    "escaped nul": (lambda: iter([b'{"text": "ok"}\n{"text": "a\\u0000b"}\n']), "line 2"),
    "not an object": (lambda: iter([b'["text", "x"]\n']), "line 1"),
    "a string": (lambda: iter([jsonl(TEXT_ROWS), b'"just a string"\n']), "line 4"),
    "wrong role": (
        lambda: iter([b'{"messages": [{"role": "root", "content": "x"}]}\n']),
        "line 1",
    ),
    "no assistant": (
        lambda: iter([jsonl(CHAT_ROWS[:2]), b'{"messages": [{"role": "user", "content": "x"}]}\n']),
        "line 3",
    ),
    "mixed formats": (lambda: iter([jsonl(TEXT_ROWS), jsonl(CHAT_ROWS[:1])]), "line 4"),
    "truncated json": (lambda: iter([b'{"text": "unterminated\n']), "line 1"),
    "lone surrogate": (lambda: iter([b'{"text": "\\ud800"}\n']), "line 1"),
    "empty": (lambda: iter([b""]), "empty"),
    "blank lines only": (lambda: iter([b"\n \n\t\n"]), "empty"),
    "50 MB line": (lambda: big_line(50 << 20), "line 1"),
    "deep nesting": (lambda: iter([b"[" * 100_000 + b"]" * 100_000 + b"\n"]), "line 1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_DATASETS))
def test_hostile_dataset_is_refused_and_leaves_nothing(
    client: TestClient, settings: Settings, snapshot: Snapshot, case: str
) -> None:
    make, needle = HOSTILE_DATASETS[case]
    before, files_before = snapshot(), all_files_under(settings.data_dir / "storage")
    response = upload_stream(client, make())
    assert response.status_code in (413, 422), (case, response.text[:300])
    body = response.json()
    assert needle in body["detail"] and body["error"]["param"] == "file", body["detail"]
    assert "Traceback" not in response.text
    assert snapshot() == before
    assert all_files_under(settings.data_dir / "storage") == files_before


def test_row_limit(client: TestClient, snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_MAX_ROWS", "1000")
    reset_settings()
    before = snapshot()
    response = upload_stream(client, tiny_rows(1_000_000))
    assert response.status_code == 422
    assert "line 1001" in response.json()["detail"] and "1000 rows" in response.json()["detail"]
    assert snapshot() == before


@pytest.mark.parametrize(
    ("variable", "value"), [("MAX_UPLOAD_BYTES", "5000"), ("MAX_LINE_BYTES", "64")]
)
def test_byte_limits(
    client: TestClient,
    snapshot: Snapshot,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(f"LORAFLEET_{variable}", value)
    reset_settings()
    before = snapshot()
    row = b'{"text": "' + b"x" * 100 + b'"}\n'
    response = upload_stream(client, iter([row] * 100))
    expected = 413 if variable == "MAX_UPLOAD_BYTES" else 422
    assert response.status_code == expected, response.text
    assert value in response.json()["detail"]
    assert snapshot() == before


HOSTILE_FILENAMES = [
    b"../../etc/passwd",
    b"..\\..\\windows\\system32",
    b"/etc/shadow",
    b"..",
    b"a\x00b.jsonl",
    b"\xff\xfe.jsonl",
    b"%2e%2e%2fetc%2fpasswd",
    b"x\r\nX-Injected: 1",
    b"",
]


@pytest.mark.parametrize("filename", HOSTILE_FILENAMES)
def test_file_names_are_labels_never_paths(
    client: TestClient, settings: Settings, filename: bytes
) -> None:
    response = upload_stream(client, iter([jsonl(TEXT_ROWS)]), filename)
    assert response.status_code == 201, response.text
    body = response.json()
    name = body["filename"]
    assert "/" not in name and "\\" not in name and "\x00" not in name and "\n" not in name
    assert name not in ("", ".", "..")
    assert client.get(f"/files/{body['id']}").json()["filename"] == name
    # Storage keys come from the id alone; nothing was written outside the storage root.
    with session_factory()() as s:
        keys = list(s.scalars(select(File.storage_key)))
    assert keys == [f"files/{body['id']}.jsonl"]
    root = settings.data_dir
    assert all(
        p.startswith(str(root / "storage" / "files")) for p in all_files_under(root / "storage")
    )
    assert not (root / "etc").exists() and not (root.parent / "etc").exists()


def test_long_file_name_is_refused(client: TestClient, snapshot: Snapshot) -> None:
    before = snapshot()
    response = upload_stream(client, iter([jsonl(TEXT_ROWS)]), b"x" * 600)
    assert response.status_code == 422 and "filename" in response.json()["detail"]
    assert snapshot() == before


HOSTILE_MODELS = [
    "../x",
    "../outside",
    "/etc",
    "/etc/passwd",
    "a/../../b",
    "org/../tiny",
    "~root",
    "~/models",
    "..",
    ".",
    "./tiny",
    "tiny/",
    "%2e%2e%2fetc",
    "..%2Fetc",
    "tiny%00",
    "tiny\x00",
    "tiny\x00/../../etc",
    "..\\..\\etc",
    "tiny\\..\\..",
    "C:\\Windows",
    "file:///etc/passwd",
    "http://evil.example/x",
    "org/name/extra",
    " tiny",
    "tiny\n",
    "\u2024\u2024/etc",
    "a" * 10_000,
]


@pytest.mark.parametrize("name", HOSTILE_MODELS)
def test_base_model_is_never_a_path(
    client: TestClient, settings: Settings, tenants: Tenants, name: str
) -> None:
    outside = settings.data_dir / "outside"  # a real model folder next to MODELS_DIR
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text("{}")
    with session_factory()() as s:
        jobs_before = s.scalar(select(func.count()).select_from(Job))
    for url, body in (
        ("/jobs", {"base_model": name, "training_file": tenants.file_id}),
        ("/v1/fine_tuning/jobs", {"model": name, "training_file": tenants.file_id}),
    ):
        response = client.post(url, json=body)
        # The OpenAI facade answers invalid requests 400, as OpenAI does.
        assert response.status_code in (400, 422), (url, name, response.text[:300])
        assert "Traceback" not in response.text and str(settings.data_dir) not in response.text
    with session_factory()() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == jobs_before


def test_resolve_base_model_refuses_paths(settings: Settings) -> None:
    """The engine-side resolver agrees with the API-side check on every hostile name."""
    from shared.modelinfo import resolve_base_model

    for name in HOSTILE_MODELS:
        with pytest.raises(ValueError):
            resolve_base_model(name, settings.models_path, "*")
    assert resolve_base_model("tiny", settings.models_path, "*") == settings.models_path / "tiny"


# A bare ".." is not here: the HTTP client itself normalises "/jobs/.." to "/" before sending.
HOSTILE_IDS = [
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "%00",
    "ftjob-%00",
    "%ff%fe",
    "%ED%A0%80",
    "a" * 5000,
    "ftjob-" + "f" * 24 + "%0d%0aX-Injected:%201",
    "%25",
    "'%20OR%20'1'='1",
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_odd_ids_are_404_or_422_never_5xx(client: TestClient, tenants: Tenants, bad: str) -> None:
    urls = [
        f"/jobs/{bad}",
        f"/jobs/{bad}/progress",
        f"/jobs/{bad}/events",
        f"/jobs/{bad}/metrics",
        f"/jobs/{bad}/checkpoints",
        f"/jobs/{bad}/adapter",
        f"/jobs/{bad}/adapter/url",
        f"/jobs/{bad}/checkpoints/1/adapter",
        f"/jobs/{tenants.finished_job_id}/checkpoints/{bad}/adapter",
        f"/files/{bad}",
        f"/v1/files/{bad}",
        f"/v1/files/{bad}/content",
        f"/v1/fine_tuning/jobs/{bad}",
        f"/v1/fine_tuning/jobs/{bad}/events",
        f"/jobs?after={bad}",
        f"/v1/fine_tuning/jobs?after={bad}",
        f"/jobs/{tenants.job_id}/events?after={bad}",
    ]
    refused = (400, 404, 422)  # 400: the OpenAI facade's status for invalid requests
    for url in urls:
        response = client.get(url)
        assert response.status_code in refused, (url, response.status_code, response.text[:200])
        assert "x-injected" not in {k.lower() for k in response.headers}
    for url in (f"/jobs/{bad}/cancel", f"/v1/fine_tuning/jobs/{bad}/cancel"):
        assert client.post(url).status_code in refused, url
    for field in ("training_file", "validation_file"):
        body = {"base_model": "tiny", "training_file": tenants.file_id, field: bad}
        assert client.post("/jobs", json=body).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"suffix": "a\x00b"},
        {"webhook_url": "http://example.com/\x00"},
        {"resources": {"gpu_type": "\x00"}},
        {"suffix": "\ud800"},
        {"training_file": "file-\x00"},
    ],
)
def test_unstorable_strings_in_json_bodies(
    client: TestClient, tenants: Tenants, body: dict[str, Any]
) -> None:
    full = {"base_model": "tiny", "training_file": tenants.file_id, **body}
    # json= would refuse a lone surrogate client-side; send what a hostile client sends.
    import json

    raw = json.dumps(full).encode()
    for url in ("/jobs", "/estimate", "/v1/fine_tuning/jobs"):
        response = client.post(url, content=raw, headers={"Content-Type": "application/json"})
        # 404: /estimate is not there (yet); 400: the OpenAI facade's status for bad input.
        assert response.status_code in (400, 404, 422), (url, response.text[:200])


def test_json_body_limits(client: TestClient, tenants: Tenants) -> None:
    huge = b'{"base_model": "tiny", "training_file": "' + b"f" * (2 << 20) + b'"}'
    response = client.post("/jobs", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    deep = b"[" * 200_000 + b"]" * 200_000
    for payload in (deep, b"{", b"\xff\xfe", b"null", b"[]", b'"x"', b"1e999999"):
        response = client.post(
            "/jobs", content=payload, headers={"Content-Type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (payload[:20], response.text[:200])


HYPERPARAMETERS = [
    ("lora", {"r": 0}),
    ("lora", {"r": 10**9}),
    ("lora", {"alpha": -1}),
    ("lora", {"dropout": 1.5}),
    ("lora", {"target_modules": ["../../x"]}),
    ("lora", {"target_modules": []}),
    ("lora", {"target_modules": [f"m{i}" for i in range(1000)]}),
    ("training", {"learning_rate": -1}),
    ("training", {"learning_rate": 1e9}),
    ("training", {"epochs": 0}),
    ("training", {"epochs": 10**9}),
    ("training", {"batch_size": 10**9}),
    ("training", {"max_steps": -5}),
    ("training", {"max_seq_length": 10**9}),
    ("training", {"gradient_accumulation_steps": 0}),
    ("training", {"seed": -1}),
    ("training", {"unknown": 1}),
    ("resources", {"gpus": -1}),
    ("resources", {"gpus": 10**6}),
]


@pytest.mark.parametrize(("section", "values"), HYPERPARAMETERS)
def test_hyperparameter_ranges(
    client: TestClient, tenants: Tenants, section: str, values: dict[str, Any]
) -> None:
    body = {"base_model": "tiny", "training_file": tenants.file_id, section: values}
    response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    assert section in response.json()["error"]["param"]


def test_active_job_quota_per_owner(
    client: TestClient, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_MAX_ACTIVE_JOBS_PER_OWNER", "2")
    reset_settings()
    body = {"base_model": "tiny", "training_file": tenants.file_id}
    # alice already holds one queued job (the fixture's); one more fits, the next does not.
    assert client.post("/jobs", json=body).status_code == 201
    refused = client.post("/jobs", json=body)
    assert refused.status_code == 429 and "limit 2" in refused.json()["detail"]
    # The quota is per owner: bob is not blocked by alice's jobs.
    bob_file = client.post(
        "/files", files={"file": ("b.jsonl", jsonl(TEXT_ROWS))}, headers=tenants.bob
    ).json()["id"]
    bob_body = {"base_model": "tiny", "training_file": bob_file}
    assert client.post("/jobs", json=bob_body, headers=tenants.bob).status_code == 201
    # Cancelling frees a slot.
    client.post(f"/jobs/{tenants.job_id}/cancel")
    assert client.post("/jobs", json=body).status_code == 201


def test_storage_keys_derive_from_ids_only(client: TestClient, tenants: Tenants) -> None:
    with session_factory()() as s:
        keys = list(s.scalars(select(File.storage_key)))
    assert keys and all(re.fullmatch(r"files/file-[0-9a-f]{24}\.jsonl", k) for k in keys)
