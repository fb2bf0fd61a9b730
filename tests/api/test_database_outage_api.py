"""The API while its database is unreachable (restarted, failing over): a 503 that says to retry,
in the native and in OpenAI's error shape, with ``Retry-After``; and served again as soon as the
database is back, without restarting the API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from shared.config import Settings, reset_settings
from shared.db import dispose_engines, session_factory
from shared.services.keys import create_key
from tests.api.live import wait_for
from tests.conftest import TEXT_ROWS, jsonl
from tests.e2e.servers import TcpProxy


@pytest.fixture
def proxied(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, TcpProxy]]:
    """A TestClient whose database connections go through a proxy the test can cut."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("a database server to cut off (PostgreSQL)")
    proxy = TcpProxy(url.port or 5432)
    monkeypatch.setenv(
        "LORAFLEET_DATABASE_URL",
        url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
    )
    reset_settings()
    dispose_engines()
    from api.main import create_app

    with session_factory()() as s:
        key, _ = create_key(s, "alice")
    try:
        with TestClient(create_app()) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            yield client, proxy
    finally:
        dispose_engines()
        proxy.down()


def test_database_outage_is_a_503_to_retry_then_served_again(
    proxied: tuple[Any, TcpProxy],
) -> None:
    client, proxy = proxied
    assert client.get("/jobs").status_code == 200
    proxy.down()
    native = client.get("/jobs")
    assert native.status_code == 503, native.text
    assert native.json()["error"]["code"] == "database_unavailable"
    assert "retry" in native.json()["detail"] and native.headers["Retry-After"] == "2"
    openai = client.get("/v1/fine_tuning/jobs")
    assert openai.status_code == 503, openai.text
    assert openai.json()["error"]["code"] == "database_unavailable"
    assert openai.headers["Retry-After"] == "2"
    assert "Traceback" not in native.text + openai.text
    proxy.up()
    assert client.get("/jobs").status_code == 200  # the pool reconnects, no API restart


def test_event_stream_rides_out_a_database_outage(proxied: tuple[Any, TcpProxy]) -> None:
    """A watcher's SSE stream stays open while the database is away (keep-alive pause, no broken
    stream) and delivers what happened meanwhile once it is back, until the job ends."""
    client, proxy = proxied
    upload = client.post("/files", files={"file": ("t.jsonl", jsonl(TEXT_ROWS))})
    body = {
        "base_model": "tiny",
        "training_file": upload.json()["id"],
        "training": {"max_steps": 3},
    }
    job = client.post("/jobs", json=body)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    lines: list[str] = []
    ended = threading.Event()

    def watch() -> None:
        headers = {"Accept": "text/event-stream"}
        with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as stream:
            for line in stream.iter_lines():
                lines.append(line)
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(lambda: any(line.startswith("data:") for line in lines), 20, what="the first event")
    proxy.down()
    time.sleep(2.0)  # several polls fail meanwhile
    assert not ended.is_set(), "the stream stays open while the database is away"
    proxy.up()
    cancelled = client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert ended.wait(30), "the stream ends once the job is final"
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert any("cancel" in e.get("message", "") for e in events), events
