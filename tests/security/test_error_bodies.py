"""Error bodies carry a message and a code, never a traceback, a setting or a secret."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.config import Settings, reset_settings

SECRET = "hunter2-db-password"


def test_unexpected_errors_are_a_plain_500(settings: Settings) -> None:
    app = create_app()

    @app.get("/boom")
    def boom() -> None:  # a bug anywhere in a route, with a secret in its message
        raise RuntimeError(f"cannot connect to postgresql://lorafleet:{SECRET}@db/prod")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "code": "internal_error",
        "message": "internal server error",
        "param": None,
    }
    assert SECRET not in response.text and "Traceback" not in response.text


def test_auth_errors_do_not_echo_the_credentials(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    for header in ("Bearer lf-guessed-key-123", "Basic lf-guessed-key-123", "lf-guessed-key-123"):
        response = anonymous.get("/jobs", headers={"Authorization": header})
        assert response.status_code == 401 and "guessed" not in response.text


def test_readiness_does_not_leak_broker_credentials(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_BROKER_URL", f"redis://admin:{SECRET}@127.0.0.1:1/0")
    reset_settings()
    response = client.get("/readyz")
    assert response.status_code == 503 and SECRET not in response.text
