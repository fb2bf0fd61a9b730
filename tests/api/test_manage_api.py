"""Managing what users create, and refusing at submit what cannot run (TestClient, both DBs).

Delete/clone/queue position of jobs, ``GET /models``, admin keys, and the submit refusals of
issue 14: sequence length beyond the model, memory beyond every worker (GPU and CPU RAM), hub ids
the (loopback, fake) hub does not know.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shared.config import Settings, reset_settings
from shared.db import session_factory
from shared.model_names import parse_model_name
from shared.services import fleet, keys, runs
from shared.storage import Storage
from tests.conftest import CHAT_ROWS, jsonl


def _file(client: Any, rows: list[dict[str, Any]] | None = None) -> str:
    response = client.post("/files", files={"file": ("t.jsonl", jsonl(rows or CHAT_ROWS))})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def _body(file_id: str, **extra: Any) -> dict[str, Any]:
    return {"base_model": "tiny", "training_file": file_id, "training": {"max_steps": 2}, **extra}


def _admin() -> dict[str, str]:
    with session_factory()() as s:
        key, _ = keys.create_key(s, "ops", admin=True)
    return {"Authorization": f"Bearer {key}"}


def _succeed(job_id: str, storage: Storage) -> None:
    storage.put_stream(f"jobs/{job_id}/adapter.tar.gz", _bytes(b"adapter"))
    storage.put_stream(f"jobs/{job_id}/checkpoints/step_1/adapter_model.safetensors", _bytes(b"c"))
    with session_factory()() as s:
        runs.claim_job(s, job_id, "w1", 30)
        lease = runs.Lease(job_id, "w1", 1)
        runs.record_checkpoint(s, lease, 1, f"jobs/{job_id}/checkpoints/step_1/", "0" * 64, {})
        runs.finish_job(
            s,
            lease,
            "succeeded",
            adapter_key=f"jobs/{job_id}/adapter.tar.gz",
            adapter_sha256="a" * 64,
            adapter_bytes=7,
        )


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_delete_final_job_keeps_a_tombstone(client: Any, storage: Storage) -> None:
    file_id = _file(client)
    job = client.post("/jobs", json=_body(file_id, suffix="v1")).json()
    running = client.delete(f"/jobs/{job['id']}")
    assert running.status_code == 409 and running.json()["error"]["code"] == "job_active"
    assert "cancel it first" in running.json()["detail"]

    _succeed(job["id"], storage)
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["fine_tuned_model"] == f"ft:tiny:alice:v1:{job['id']}"
    assert parse_model_name(done["fine_tuned_model"]).job_id == job["id"]  # type: ignore[union-attr]
    assert storage.list(f"jobs/{job['id']}/")

    deleted = client.delete(f"/jobs/{job['id']}")
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["deleted_at"] and body["status"] == "succeeded"
    assert body["fine_tuned_model"] is None and body["adapter_sha256"] is None
    assert storage.list(f"jobs/{job['id']}/") == [], "adapter and checkpoints left storage"
    assert client.get(f"/jobs/{job['id']}").json()["deleted_at"], "the tombstone still answers"
    assert job["id"] not in [j["id"] for j in client.get("/jobs").json()["data"]]
    gone = client.get(f"/jobs/{job['id']}/adapter")
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "job_deleted"
    assert client.get(f"/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert client.delete(f"/jobs/{job['id']}").status_code == 200, "deleting again is harmless"
    events = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["data"]]
    assert events[-1] == "job deleted"


def test_clone_merges_overrides_and_checks_them(client: Any) -> None:
    file_id = _file(client)
    source = client.post(
        "/jobs", json=_body(file_id, training={"max_steps": 2, "learning_rate": 0.001})
    ).json()
    clone = client.post(
        f"/jobs/{source['id']}/clone", json={"suffix": "b", "training": {"learning_rate": 1e-4}}
    )
    assert clone.status_code == 201, clone.text
    copy = clone.json()
    assert copy["id"] != source["id"] and copy["suffix"] == "b"
    assert copy["training"]["learning_rate"] == 1e-4
    assert copy["training"]["max_steps"] == 2, "other settings of the block are kept"
    assert copy["lora"] == source["lora"] and copy["training_file"] == file_id
    plain = client.post(f"/jobs/{source['id']}/clone")
    assert plain.status_code == 201 and plain.json()["training"] == source["training"]

    bad = client.post(f"/jobs/{source['id']}/clone", json={"training": {"batch_size": 0}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "training.batch_size"
    unknown = client.post(f"/jobs/{source['id']}/clone", json={"lora": {"rank": 4}})
    assert unknown.status_code == 422 and "lora.rank" in unknown.json()["detail"]
    assert client.post("/jobs/ftjob-nope/clone", json={}).status_code == 404


def test_queue_position(client: Any, bob_headers: dict[str, str]) -> None:
    file_id = _file(client)
    first = client.post("/jobs", json=_body(file_id)).json()
    assert first["queue_position"] == 1
    second = client.post("/jobs", json=_body(file_id)).json()
    urgent = client.post("/jobs", json=_body(file_id, priority=5)).json()
    assert urgent["queue_position"] == 1, "priority first"
    assert client.get(f"/jobs/{first['id']}").json()["queue_position"] == 2
    assert client.get(f"/jobs/{second['id']}").json()["queue_position"] == 3
    listed = {j["id"]: j["queue_position"] for j in client.get("/jobs").json()["data"]}
    assert listed == {urgent["id"]: 1, first["id"]: 2, second["id"]: 3}
    with session_factory()() as s:
        runs.claim_job(s, urgent["id"], "w1", 30)
    assert client.get(f"/jobs/{urgent['id']}").json()["queue_position"] is None
    # alice now has one running job: bob's new job goes before her queued ones (fair share).
    bob_file = client.post(
        "/files", files={"file": ("b.jsonl", jsonl(CHAT_ROWS))}, headers=bob_headers
    ).json()["id"]
    bob = client.post("/jobs", json=_body(bob_file), headers=bob_headers).json()
    assert bob["queue_position"] == 1
    assert client.get(f"/jobs/{first['id']}").json()["queue_position"] == 2


def test_models_list(client: Any, settings: Settings) -> None:
    from worker.tiny_models import make_tiny_gpt2

    make_tiny_gpt2(settings.models_path / "gpt2")
    (settings.models_path / "broken").mkdir()
    (settings.models_path / "broken" / "config.json").write_text("{}")
    response = client.get("/models")
    assert response.status_code == 200, response.text
    models = {m["id"]: m for m in response.json()["data"]}
    assert set(models) == {"tiny", "gpt2", "broken"}
    assert models["tiny"]["parameters"] > 0 and models["tiny"]["context_length"] == 2048
    assert models["tiny"]["chat_template"] is False and models["tiny"]["model_type"] == "llama"
    assert models["gpt2"]["model_type"] == "gpt2" and models["gpt2"]["context_length"]
    assert models["broken"]["error"] and models["broken"]["parameters"] is None
    assert response.json()["allowed_hub_models"] == "*"
    assert client.get("/models", headers={"Authorization": ""}).status_code == 401


def test_keys_list_and_revoke_for_admins(client: Any, bob_headers: dict[str, str]) -> None:
    admin = _admin()
    assert client.get("/keys").status_code == 403, "alice is no admin"
    listed = client.get("/keys", headers=admin).json()["data"]
    assert {k["owner"] for k in listed} >= {"alice", "bob", "ops"}
    assert all("key_hash" not in k and "lf-" not in json.dumps(k) for k in listed)
    bob_id = next(k["id"] for k in listed if k["owner"] == "bob")
    assert client.get("/files", headers=bob_headers).status_code == 200
    revoked = client.post(f"/keys/{bob_id}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert client.get("/files", headers=bob_headers).status_code == 401
    assert client.post(f"/keys/{bob_id}/revoke", headers=admin).status_code == 200
    assert client.post("/keys/key-nope/revoke", headers=admin).status_code == 404
    only_bob = client.get("/keys", params={"owner": "bob"}, headers=admin).json()["data"]
    assert [k["id"] for k in only_bob] == [bob_id]


def test_sequence_length_beyond_the_model_is_refused(client: Any) -> None:
    body = _body(_file(client), training={"max_seq_length": 100000})
    refused = client.post("/jobs", json=body)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["param"] == "training.max_seq_length" and error["code"] == "sequence_too_long"
    assert "2048" in error["message"] and "set training.max_seq_length" in error["message"]
    warned = client.post("/estimate", json=body).json()
    assert any("max_position_embeddings" in w for w in warned["warnings"])


def test_memory_beyond_every_worker_is_refused(client: Any) -> None:
    file_id = _file(client)
    with session_factory()() as s:
        fleet.register_worker(
            s, "cpu@a", "a", procs=2, version="0.1.0", host_memory_bytes=64 * 1024**2
        )  # 64 MiB of RAM
    big = _body(file_id, training={"batch_size": 64, "max_seq_length": 2048})
    estimate = client.post("/estimate", json=big).json()
    assert estimate["fits"] is False and estimate["fleet"]["host_memory_bytes"] == 64 * 1024**2
    refused = client.post("/jobs", json=big)
    assert refused.status_code == 422, refused.text
    message = refused.json()["detail"]
    assert "RAM" in message and "2 training process(es)" in message
    assert "training.batch_size" in message and "LORAFLEET_WORKER_PROCS" in message
    small = _body(file_id, training={"batch_size": 1, "max_seq_length": 16})
    assert client.post("/estimate", json=small).json()["fits"] is True
    assert client.post("/jobs", json=small).status_code == 201


class FakeHub:
    """A model hub on loopback that knows one model (``HF_ENDPOINT`` points the API at it)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                known = self.path == "/api/models/known-org/known-model"
                self.send_response(200 if known else 401)  # the hub answers 401 when unknown
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id": "known-org/known-model"}' if known else b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    reset_settings()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def test_unknown_hub_id_is_refused_when_the_hub_answers(client: Any, fake_hub: FakeHub) -> None:
    file_id = _file(client)
    refused = client.post("/jobs", json=_body(file_id, base_model="meta-llama/Llama-3-8B"))
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["param"] == "base_model" and error["code"] == "model_not_found"
    assert "HF_TOKEN" in error["message"] and "GET /models" in error["message"]
    accepted = client.post("/jobs", json=_body(file_id, base_model="known-org/known-model"))
    assert accepted.status_code == 201, accepted.text


def test_unreachable_hub_accepts_and_leaves_it_to_the_worker(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.api.live import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    reset_settings()
    response = client.post("/jobs", json=_body(_file(client), base_model="meta-llama/Llama-3-8B"))
    assert response.status_code == 201, response.text


def test_webhook_to_an_internal_literal_is_refused_at_submit(client: Any) -> None:
    file_id = _file(client)
    refused = client.post("/jobs", json=_body(file_id, webhook_url="http://169.254.169.254/x"))
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "webhook_url"
    assert "LORAFLEET_WEBHOOK_ALLOW" in refused.json()["detail"]
    public = client.post("/jobs", json=_body(file_id, webhook_url="https://hooks.example.com/x"))
    assert public.status_code == 201, "host names are judged at send time, not at submit"


def test_suffix_is_validated(client: Any) -> None:
    refused = client.post("/jobs", json=_body(_file(client), suffix="a:b"))
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "suffix"
