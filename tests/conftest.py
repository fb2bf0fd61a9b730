"""Shared fixtures: every DB test runs on a real SQLite file and on the real PostgreSQL.

PostgreSQL isolation: each test gets its own schema (selected through ``search_path`` in the
URL), migrated by the real Alembic revisions, and dropped afterwards. The broker is the embedded
filesystem transport inside the test's own data directory: real Celery publishing, no server.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings, reset_settings
from shared.db import dispose_engines, session_factory, upgrade_to_head
from shared.queueing import reset_publisher
from shared.storage import Storage, storage_from_settings

# Tests run in parallel (-n 3 on 2 cores) beside training subprocesses and live servers: one
# OpenMP thread per process. More threads than cores spin-wait on each other (measured: a 30-step
# engine test took 43 s with the default threads on a loaded 2-core host, 1.5 s with one). Set
# before torch is imported anywhere; subprocesses inherit it (the engine treats it as a cap).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No test may talk to the model hub (traffic off this machine is forbidden here): submit-time hub
# checks and workers stay offline unless a test points HF_ENDPOINT at a loopback fake hub.
os.environ["HF_HUB_OFFLINE"] = "1"

PG_BASE = os.environ.get(
    "LORAFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": str(2 * i)},
        ]
    }
    for i in range(5)
]
COMPLETION_ROWS = [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(4)]
ALPACA_ROWS = [
    {"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ("abc", "hello")
] + [{"instruction": "Say hi.", "output": "hi"}]
TEXT_ROWS = [{"text": f"Document number {i}."} for i in range(3)]


HEADER_LLAMA_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
    "vocab_size": 100,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
HEADER_LLAMA_TENSORS: dict[str, list[int]] = {
    "model.embed_tokens.weight": [100, 16],
    "model.layers.0.self_attn.q_proj.weight": [16, 16],
    "model.layers.0.self_attn.k_proj.weight": [4, 16],
    "model.layers.0.self_attn.v_proj.weight": [4, 16],
    "model.layers.0.self_attn.o_proj.weight": [16, 16],
    "model.layers.0.mlp.gate_proj.weight": [32, 16],
    "model.layers.0.mlp.up_proj.weight": [32, 16],
    "model.layers.0.mlp.down_proj.weight": [16, 32],
    "model.layers.0.input_layernorm.weight": [16],
    "model.layers.0.post_attention_layernorm.weight": [16],
    "model.norm.weight": [16],
    "lm_head.weight": [100, 16],
}


def write_header_model(folder: Path) -> Path:
    """A Llama-shaped model folder the service can read (config + a safetensors of zeros).

    No torch: services only read the header (shapes) to check target_modules and estimate memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HEADER_LLAMA_CONFIG))
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in HEADER_LLAMA_TENSORS.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return folder


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSONL bytes."""
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _postgres_available() -> bool:
    engine = create_engine(PG_BASE)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'lorafleet.db'}"
        dispose_engines()
        return
    if not _postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_BASE}")
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        dispose_engines()
        with admin.connect() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for one test: its own data dir, database, storage, broker, and a `tiny` model."""
    data_dir = tmp_path / "data"
    models = data_dir / "models"
    write_header_model(models / "tiny")
    for name in list(os.environ):
        if name.startswith("LORAFLEET_") and name != "LORAFLEET_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(data_dir))
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", db_url)
    monkeypatch.setenv("LORAFLEET_MODELS_DIR", str(models))
    reset_settings()
    reset_publisher()
    upgrade_to_head(db_url)
    yield get_settings()
    reset_publisher()
    reset_settings()


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    """A session on the test database."""
    with session_factory()() as s:
        yield s


@pytest.fixture
def storage(settings: Settings) -> Storage:
    """The test's local storage."""
    return storage_from_settings(settings)


@pytest.fixture
def make_file(session: Session, storage: Storage) -> Callable[..., Any]:
    """Factory: upload rows through the real service; returns the File row."""
    import io

    from shared.services.files import create_file

    def make(rows: list[dict[str, Any]] | None = None, owner: str = "alice", **kwargs: Any) -> Any:
        data = jsonl(rows if rows is not None else CHAT_ROWS)
        row, _ = create_file(session, storage, owner, "train.jsonl", io.BytesIO(data), **kwargs)
        return row

    return make


@pytest.fixture
def make_job(session: Session, make_file: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: create a job through the real service (publishes to the embedded broker)."""
    from shared.services.jobs import create_job
    from shared.spec import JobSpec

    def make(owner: str = "alice", training_file: str | None = None, **body: Any) -> Any:
        file_id = training_file or make_file(owner=owner).id
        spec = JobSpec.model_validate(
            {"base_model": "tiny", "training_file": file_id, "training": {"max_steps": 2}, **body}
        )
        job, _ = create_job(session, owner, spec)
        return job

    return make


@pytest.fixture
def client(settings: Settings) -> Iterator[Any]:
    """A TestClient on a fresh app (lifespan run: migrations at head), authenticated as alice."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from shared.services.keys import create_key

    with session_factory()() as s:
        alice, _ = create_key(s, "alice")
    with TestClient(create_app()) as test_client:
        test_client.headers["Authorization"] = f"Bearer {alice}"
        yield test_client


@pytest.fixture
def bob_headers(settings: Settings) -> dict[str, str]:
    """Authorization headers of a second owner."""
    from shared.services.keys import create_key

    with session_factory()() as s:
        bob, _ = create_key(s, "bob")
    return {"Authorization": f"Bearer {bob}"}
