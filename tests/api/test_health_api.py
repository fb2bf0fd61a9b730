"""Probes and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import pytest

from shared.config import reset_settings
from shared.db import session_factory
from shared.services.keys import create_key


def test_healthz_readyz(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_with_redis(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_BROKER_URL", "redis://127.0.0.1:6379/15")
    reset_settings()
    assert client.get("/readyz").status_code == 200


def test_readyz_broker_down_is_503(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens
    reset_settings()
    response = client.get("/readyz", headers={"Authorization": ""})
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "broker": "unavailable"},
    }, "an anonymous probe learns what is down, never the error text (hosts, ports, paths)"
    assert "127.0.0.1" not in response.text and "Error" not in response.text
    # The key of a non-admin owner gets no more than anonymous callers.
    assert "details" not in client.get("/readyz").json()

    with session_factory()() as session:
        admin, _ = create_key(session, "ops", admin=True)
    detailed = client.get("/readyz", headers={"Authorization": f"Bearer {admin}"}).json()
    assert detailed["checks"]["broker"] == "unavailable"
    assert ":1" in detailed["details"]["broker"] or "Error" in detailed["details"]["broker"]


def test_metrics(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Admin-only by default (tests/security); a public scrape endpoint is an explicit choice.
    monkeypatch.setenv("LORAFLEET_METRICS_PUBLIC", "true")
    reset_settings()
    file_id = client.post("/files", files={"file": ("t.jsonl", b'{"text": "hi"}\n')}).json()["id"]
    body = {"base_model": "tiny", "training_file": file_id}
    job_id = client.post("/jobs", json=body).json()["id"]
    client.post("/jobs", json=body)
    client.post(f"/jobs/{job_id}/cancel")
    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    text = response.text
    assert 'lorafleet_jobs{state="queued"} 1.0' in text
    assert 'lorafleet_jobs{state="cancelled"} 1.0' in text
    assert 'lorafleet_jobs{state="running"} 0.0' in text
    assert "lorafleet_oldest_queued_job_age_seconds" in text


def test_auth_disabled_acts_as_local(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_AUTH_DISABLED", "1")
    reset_settings()
    response = client.get("/files", headers={"Authorization": ""})
    assert response.status_code == 200 and response.json()["data"] == []
