"""The API while its database is unreachable (restarted, failing over): a 503 that says to retry,
in the native and in OpenAI's error shape, with ``Retry-After``; and served again as soon as the
database is back, without restarting the API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from shared.config import Settings, reset_settings
from shared.db import dispose_engines, session_factory
from shared.services.keys import create_key
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
