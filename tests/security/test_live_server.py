"""The real server process: streaming uploads in bounded memory, logs without keys, key storage,
and ``lorafleet serve`` refusing an open server.

These need a real uvicorn (its access log, its process memory) and the real CLI, so they run
``python -m cli`` in subprocesses through the e2e helpers, on the embedded defaults.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.live import Deployment, deployment

ROWS = 1_000_000


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water resident memory (VmHWM), which no sampling could miss."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def million_rows() -> Iterator[bytes]:
    boundary = "b0undary"
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    for start in range(0, ROWS, 10_000):
        yield b"".join(
            b'{"prompt": "question %07d ", "completion": "answer %07d"}\n' % (i, i)
            for i in range(start, start + 10_000)
        )
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Deployment]:
    with deployment(tmp_path, {}) as dep:
        dep.key = dep.create_key("alice")
        dep.start_api()
        yield dep


@pytest.mark.timeout(300)
def test_million_row_upload_streams_in_bounded_memory(live: Deployment) -> None:
    api_pid = live.procs[0].pid
    with live.client() as http:
        warm = http.post("/files", files={"file": ("w.jsonl", b'{"text": "warm up"}\n')})
        assert warm.status_code == 201
        baseline = peak_rss_bytes(api_pid)
        response = http.post(
            "/files",
            content=million_rows(),
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
            timeout=240,
        )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rows"] == ROWS and body["bytes"] > 50 * 1024 * 1024
    growth = peak_rss_bytes(api_pid) - baseline
    # Buffering the 55 MB body, or its million lines, would add far more than this.
    assert growth < 32 * 1024 * 1024, f"API peak memory grew by {growth / 2**20:.0f} MiB"


def test_logs_never_carry_keys(live: Deployment) -> None:
    wrong = "lf-" + "W" * 43
    with live.client() as http:
        assert http.get("/jobs").status_code == 200
        assert http.get("/files/file-" + "0" * 24).status_code == 404
        assert http.get("/jobs", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        assert http.get("/jobs", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    log = live.log(f"api-{live.port}")
    assert '"GET /jobs HTTP/1.1" 200' in log  # the access log is on, so the check means something
    assert live.key not in log and wrong not in log
    assert "Authorization" not in log and "Bearer" not in log


def test_keys_are_printed_once_and_stored_hashed(tmp_path: Path) -> None:
    with deployment(tmp_path, {}) as dep:
        plain = dep.create_key("team-a", admin=True)
        result = dep.cli("keys", "create", "--owner", "team-b", "--json")
        assert result.returncode == 0, result.stderr
        as_json = json.loads(result.stdout.strip().splitlines()[-1])
        assert as_json["owner"] == "team-b" and as_json["admin"] is False
        db = Path(dep.env["LORAFLEET_DATA_DIR"]) / "lorafleet.db"
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT * FROM api_keys").fetchall()
        stored = repr(rows)
        for key in (plain, as_json["key"]):
            assert key.startswith("lf-") and len(key) >= 40
            assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_open_server_without_auth(tmp_path: Path, host: str) -> None:
    with deployment(tmp_path, {}, LORAFLEET_AUTH_DISABLED="true") as dep:
        result = dep.cli("serve", "--host", host, "--port", "1", timeout=60)
    assert result.returncode == 2
    assert "refusing to serve without auth" in result.stderr


def test_auth_disabled_still_needs_nothing_on_loopback(tmp_path: Path) -> None:
    """What ``make demo`` and a laptop rely on: no key on 127.0.0.1 when auth is disabled."""
    with deployment(tmp_path, {}, LORAFLEET_AUTH_DISABLED="true") as dep:
        dep.start_api()
        assert httpx.get(dep.url + "/jobs", timeout=10).status_code == 200
