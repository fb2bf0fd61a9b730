from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("e2e-models") / "tiny")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema on the shared PostgreSQL (never restarted by a test)."""
    import secrets

    from sqlalchemy import create_engine, text

    base = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    schema = f"e2e_{secrets.token_hex(5)}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{base}?options=-csearch_path%3D{schema}"
    with engine.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()
