"""``GET /jobs/{id}/adapter/url``: presigned, short-lived, owner-only; refused on local storage."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.config import reset_settings
from shared.storage import storage_from_url
from tests.security.conftest import Tenants, finish_job

# Module-scoped servers: keep this file on one xdist worker.
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's real S3 HTTP server (it checks no signature or expiry: we check the URL's terms)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_local_storage_says_to_use_the_api(client: TestClient, tenants: Tenants) -> None:
    response = client.get(f"/jobs/{tenants.finished_job_id}/adapter/url")
    assert response.status_code == 409
    body = response.json()
    assert body["error"]["code"] == "direct_download_unavailable"
    assert f"/jobs/{tenants.finished_job_id}/adapter" in body["detail"]
    # ...and that route does serve it, to its owner only.
    assert client.get(f"/jobs/{tenants.finished_job_id}/adapter").status_code == 200
    other = client.get(f"/jobs/{tenants.finished_job_id}/adapter", headers=tenants.bob)
    assert other.status_code == 404


def test_not_ready_job_is_409(client: TestClient, tenants: Tenants) -> None:
    response = client.get(f"/jobs/{tenants.job_id}/adapter/url")
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_not_ready"


@pytest.mark.parametrize("expires", [None, "60"])
def test_s3_presigned_url_is_short_lived(
    client: TestClient,
    tenants: Tenants,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    expires: str | None,
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAFLEET_STORAGE_URL": "s3://adapters-bucket/lf",
        "LORAFLEET_S3_ENDPOINT_URL": moto_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    if expires:
        monkeypatch.setenv("LORAFLEET_ADAPTER_URL_EXPIRES_SECONDS", expires)
    reset_settings()
    s3 = storage_from_url("s3://adapters-bucket/lf", moto_endpoint)
    s3.client.create_bucket(Bucket="adapters-bucket")  # type: ignore[attr-defined]
    job_id = client.post(
        "/jobs", json={"base_model": "tiny", "training_file": tenants.file_id}
    ).json()["id"]
    finish_job(s3, job_id)

    before = datetime.now(UTC)
    response = client.get(f"/jobs/{job_id}/adapter/url")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    lifetime = int(expires or 300)
    expires_at = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=lifetime - 5) < expires_at
    assert expires_at < before + timedelta(seconds=lifetime + 5)
    query = parse_qs(urlparse(body["url"]).query)
    assert query.get("X-Amz-Expires") == [str(lifetime)] or "Expires" in query
    assert httpx.get(body["url"]).content.startswith(b"not really a tar.gz")
    # Only the owner gets a URL; no key gets nothing.
    assert client.get(f"/jobs/{job_id}/adapter/url", headers=tenants.bob).status_code == 404
    anonymous = TestClient(client.app)
    assert anonymous.get(f"/jobs/{job_id}/adapter/url").status_code == 401
