"""Tenant isolation and authentication over every route of the live OpenAPI schema.

The route list is read from ``app.openapi()``, not written down here, so a route added later is
covered without anyone remembering to add it: it must either be public (health), admin-only, or
answer another owner's id exactly like a missing one.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.config import reset_settings
from shared.db import session_factory
from shared.models import Job
from shared.services.keys import create_key, revoke_key
from tests.conftest import CHAT_ROWS, jsonl
from tests.security.conftest import Tenants, bearer

PUBLIC = {"/healthz", "/readyz"}
ADMIN_PREFIXES = ("/metrics", "/workers", "/fleet", "/keys", "/queue")
MISSING_JOB = "ftjob-" + "0" * 24
MISSING_FILE = "file-" + "0" * 24
# What an attacker would hope to read back: alice's names, her event text and manifest.
ALICE_SECRETS = ("alice.jsonl", "alice-private", "alice-secret")


def routes(client: TestClient) -> list[tuple[str, str]]:
    """(METHOD, path template) of every documented operation."""
    paths: dict[str, dict[str, Any]] = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return [(m.upper(), p) for p, ops in paths.items() for m in ops if m != "parameters"]


def fill(path: str, job_id: str, file_id: str) -> str:
    """A concrete URL for a template: the given ids, step 1, and a placeholder for the rest."""
    path = path.replace("{job_id}", job_id).replace("{file_id}", file_id)
    return re.sub(r"\{[^}]+\}", "1", path)


def is_admin(path: str) -> bool:
    return path.startswith(ADMIN_PREFIXES)


def call(client: TestClient, method: str, url: str, headers: dict[str, str]) -> Any:
    # Bodies are deliberately absent or empty: auth and ownership are decided before the body.
    return client.request(method, url, headers=headers, json={} if method == "POST" else None)


def test_every_route_is_listed(client: TestClient, tenants: Tenants) -> None:
    """Guards the generic tests below against an empty route list."""
    found = {p for _, p in routes(client)}
    assert {"/files", "/jobs/{job_id}", "/jobs/{job_id}/adapter", "/metrics"} <= found
    assert "/jobs/{job_id}/adapter/url" in found


def test_every_route_but_health_needs_a_live_key(client: TestClient, tenants: Tenants) -> None:
    with session_factory()() as s:
        revoked, row = create_key(s, "carol")
        revoke_key(s, row.id)
    bad_headers = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer lf-not-a-real-key"},
        {"Authorization": "Bearer not-even-our-prefix"},
        {"Authorization": f"Basic {revoked}"},
        {"Authorization": f"bearer  {revoked}"},
        bearer(revoked),
    ]
    anonymous = TestClient(client.app)  # no default Authorization header to fall back on
    tried = 0
    for method, template in routes(client):
        url = fill(template, tenants.job_id, tenants.file_id)
        for headers in bad_headers:
            response = call(anonymous, method, url, headers)
            tried += 1
            if template in PUBLIC:
                assert response.status_code in (200, 503), (method, url)
                continue
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.headers.get("www-authenticate") == "Bearer"
            assert revoked not in response.text
    assert tried >= 100


@pytest.mark.parametrize("which", ["queued", "finished"])
def test_other_owners_ids_answer_like_missing_ones(
    client: TestClient, tenants: Tenants, which: str
) -> None:
    job_id = tenants.job_id if which == "queued" else tenants.finished_job_id
    attempts = 0
    for method, template in routes(client):
        if "{" not in template or is_admin(template):
            continue
        theirs = fill(template, job_id, tenants.file_id)
        missing = fill(template, MISSING_JOB, MISSING_FILE)
        for who in (tenants.bob, tenants.admin):
            stolen = call(client, method, theirs, who)
            absent = call(client, method, missing, who)
            attempts += 1
            assert stolen.status_code == absent.status_code == 404, (method, theirs, stolen.text)
            assert stolen.json()["error"]["code"] == absent.json()["error"]["code"]
            assert not any(secret in stolen.text for secret in ALICE_SECRETS)
    # The event stream is checked before it starts, not inside it.
    sse = client.get(
        f"/jobs/{job_id}/events", headers={**tenants.bob, "Accept": "text/event-stream"}
    )
    assert sse.status_code == 404
    assert attempts >= 20
    # bob's cancel changed nothing; alice still sees her job and her adapter.
    with session_factory()() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == ("queued" if which == "queued" else "succeeded")
        assert not job.cancel_requested
    assert client.get(f"/jobs/{job_id}", headers=tenants.alice).status_code == 200


def test_lists_hold_only_the_callers_objects(client: TestClient, tenants: Tenants) -> None:
    for url in ("/files", "/jobs", "/v1/files", "/v1/fine_tuning/jobs"):
        mine = client.get(url, headers=tenants.alice)
        assert mine.status_code == 200 and mine.json()["data"], url
        for who in (tenants.bob, tenants.admin):
            theirs = client.get(url, headers=who)
            assert theirs.status_code == 200 and theirs.json()["data"] == [], url
    # A page cursor naming alice's job is refused like an unknown one, and shows nothing.
    stolen = client.get(f"/jobs?after={tenants.job_id}", headers=tenants.bob)
    absent = client.get(f"/jobs?after={MISSING_JOB}", headers=tenants.bob)
    assert stolen.status_code == absent.status_code == 422
    assert stolen.json()["error"]["code"] == absent.json()["error"]["code"]


@pytest.mark.parametrize("url", ["/jobs", "/v1/fine_tuning/jobs"])
def test_jobs_cannot_train_on_another_owners_file(
    client: TestClient, tenants: Tenants, url: str
) -> None:
    def body(file_id: str) -> dict[str, Any]:
        if url == "/jobs":
            return {"base_model": "tiny", "training_file": file_id}
        return {"model": "tiny", "training_file": file_id}

    for field in ("training_file", "validation_file"):
        theirs, absent = body(MISSING_FILE), body(MISSING_FILE)
        theirs[field] = tenants.file_id
        stolen = client.post(url, json=theirs, headers=tenants.bob)
        missing = client.post(url, json=absent, headers=tenants.bob)
        assert 400 <= stolen.status_code < 500, stolen.text
        assert stolen.status_code == missing.status_code
        assert not any(secret in stolen.text for secret in ALICE_SECRETS)


def test_idempotency_keys_are_per_owner(client: TestClient, tenants: Tenants) -> None:
    body = {"base_model": "tiny", "training_file": tenants.file_id}
    first = client.post("/jobs", json=body, headers={**tenants.alice, "Idempotency-Key": "same"})
    assert first.status_code == 201
    bob_file = client.post(
        "/files", files={"file": ("b.jsonl", jsonl(CHAT_ROWS))}, headers=tenants.bob
    ).json()["id"]
    bob_body = {"base_model": "tiny", "training_file": bob_file}
    bobs = client.post("/jobs", json=bob_body, headers={**tenants.bob, "Idempotency-Key": "same"})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    # Same key, alice's exact body: bob still gets no replay of alice's job.
    replay = client.post("/jobs", json=body, headers={**tenants.bob, "Idempotency-Key": "same"})
    assert replay.status_code in (409, 422) and first.json()["id"] not in replay.text


def test_admin_routes(client: TestClient, tenants: Tenants) -> None:
    admin_routes = [(m, p) for m, p in routes(client) if is_admin(p)]
    assert ("GET", "/metrics") in admin_routes
    for method, template in admin_routes:
        url = fill(template, tenants.job_id, tenants.file_id)
        assert call(client, method, url, tenants.alice).status_code == 403, url
        assert call(client, method, url, tenants.bob).status_code == 403, url
        if method == "GET" and "{" not in template:
            assert call(client, method, url, tenants.admin).status_code == 200, url


def test_metrics_public_only_when_configured(
    client: TestClient, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert client.get("/metrics", headers=tenants.bob).status_code == 403
    admin = client.get("/metrics", headers=tenants.admin)
    assert admin.status_code == 200 and 'lorafleet_jobs{state="queued"}' in admin.text
    monkeypatch.setenv("LORAFLEET_METRICS_PUBLIC", "true")
    reset_settings()
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200


def test_disabled_auth_serves_loopback_only(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_AUTH_DISABLED", "true")
    reset_settings()
    for host, status in (("127.0.0.1", 200), ("::1", 200), ("203.0.113.7", 403), ("10.0.0.2", 403)):
        with TestClient(create_app(), client=(host, 40000)) as remote:
            assert remote.get("/files").status_code == status, host


def test_secure_by_default(client: TestClient) -> None:
    """No setting at all: keys are required (auth is opt-out, not opt-in)."""
    assert client.get("/jobs", headers={"Authorization": ""}).status_code == 401
