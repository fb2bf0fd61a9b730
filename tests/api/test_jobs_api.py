"""``/jobs`` over HTTP (TestClient) on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from shared.db import session_factory
from shared.services import runs
from shared.storage import Storage
from tests.api.live import free_port, wait_for
from tests.conftest import TEXT_ROWS, jsonl


def _file(client: Any) -> str:
    response = client.post("/files", files={"file": ("t.jsonl", jsonl(TEXT_ROWS))})
    assert response.status_code in (200, 201), response.text  # 200: the same bytes again
    return str(response.json()["id"])


def _body(file_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": "tiny",
        "training_file": file_id,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 0.001, "seed": 0},
        "resources": {"gpus": "all"},
        **extra,
    }


def _job(client: Any, **extra: Any) -> dict[str, Any]:
    response = client.post("/jobs", json=_body(_file(client), **extra))
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_create_and_read(client: Any) -> None:
    job = _job(client)
    assert job["status"] == "queued" and job["id"].startswith("ftjob-")
    assert job["lora"]["r"] == 4 and job["training"]["max_steps"] == 3
    assert job["error"] is None and job["attempts"] == 0 and job["fine_tuned_model"] is None
    for key in ("created_at", "started_at", "finished_at", "trained_tokens", "base_model"):
        assert key in job
    assert client.get(f"/jobs/{job['id']}").json() == job
    progress = client.get(f"/jobs/{job['id']}/progress").json()
    assert progress["status"] == "queued" and progress["step"] is None
    assert set(progress) >= {"total_steps", "epoch", "train_loss", "eta_seconds", "updated_at"}
    events = client.get(f"/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["job created"]
    assert set(events[0]) >= {"id", "created_at", "level", "message", "data"}
    assert client.get(f"/jobs/{job['id']}/metrics").json()["data"] == []
    assert client.get(f"/jobs/{job['id']}/checkpoints").json()["data"] == []


def test_bad_bodies_name_the_field(client: Any) -> None:
    file_id = _file(client)
    cases = [
        (_body(file_id, training={"max_steps": 0}), "training.max_steps"),
        (_body(file_id, lora={"r": 0}), "lora.r"),
        ({"training_file": file_id}, "base_model"),
        (_body(file_id, bogus=1), "bogus"),
        (_body(file_id, base_model="../../etc"), "base_model"),
        (_body("file-missing"), "training_file"),
    ]
    for body, field in cases:
        response = client.post("/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in response.json()["detail"], response.text
        assert response.json()["error"]["param"] == field


def test_idempotency_key(client: Any) -> None:
    body = _body(_file(client))
    first = client.post("/jobs", json=body, headers={"Idempotency-Key": "j1"})
    again = client.post("/jobs", json=body, headers={"Idempotency-Key": "j1"})
    assert first.status_code == 201 and again.status_code in (200, 201)
    assert again.json()["id"] == first.json()["id"]
    changed = client.post("/jobs", json={**body, "priority": 3}, headers={"Idempotency-Key": "j1"})
    assert changed.status_code == 409
    assert len(client.get("/jobs").json()["data"]) == 1


def test_list_pagination_and_status(client: Any) -> None:
    file_id = _file(client)
    ids = [client.post("/jobs", json=_body(file_id)).json()["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        page = client.get("/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1]
    client.post(f"/jobs/{ids[0]}/cancel")
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/jobs", params={"status": "nope"}).status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422


def test_unknown_and_other_owner(client: Any, bob_headers: dict[str, str]) -> None:
    job_id = _job(client)["id"]
    for path in ("", "/progress", "/events", "/metrics", "/checkpoints", "/adapter"):
        assert client.get(f"/jobs/{job_id}{path}", headers=bob_headers).status_code == 404
        assert client.get(f"/jobs/ftjob-unknown{path}").status_code == 404
    assert client.post(f"/jobs/{job_id}/cancel", headers=bob_headers).status_code == 404
    assert client.get("/jobs", headers=bob_headers).json()["data"] == []


def test_cancel_queued_then_conflict_on_succeeded(client: Any) -> None:
    job = _job(client)
    cancelled = client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    done = _job(client)
    with session_factory()() as session:
        runs.claim_job(session, done["id"], "w1", 30)
        runs.finish_job(
            session,
            runs.Lease(done["id"], "w1", 1),
            "succeeded",
            adapter_key="x",
            adapter_sha256="s",
        )
    assert client.post(f"/jobs/{done['id']}/cancel").status_code == 409


def test_adapter_download(client: Any, storage: Storage) -> None:
    job = _job(client)
    assert client.get(f"/jobs/{job['id']}/adapter").status_code == 409
    blob = b"\x1f\x8b fake tarball " * 1000
    digest = hashlib.sha256(blob).hexdigest()
    key = f"adapters/{job['id']}.tar.gz"
    storage.put_stream(key, io.BytesIO(blob))
    with session_factory()() as session:
        runs.claim_job(session, job["id"], "w1", 30)
        runs.finish_job(
            session,
            runs.Lease(job["id"], "w1", 1),
            "succeeded",
            adapter_key=key,
            adapter_sha256=digest,
            adapter_bytes=len(blob),
            trained_tokens=42,
        )
    response = client.get(f"/jobs/{job['id']}/adapter")
    assert response.status_code == 200 and response.content == blob
    assert response.headers["x-checksum-sha256"] == digest
    assert response.headers["etag"] == f'"{digest}"'
    assert "attachment" in response.headers["content-disposition"]
    cached = client.get(f"/jobs/{job['id']}/adapter", headers={"If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304
    finished = client.get(f"/jobs/{job['id']}").json()
    assert finished["fine_tuned_model"] == f"ft:tiny:alice::{job['id']}"
    assert finished["trained_tokens"] == 42 and finished["adapter_sha256"] == digest


def _sse_events(client: Any, job_id: str) -> list[dict[str, Any]]:
    """The event frames of a whole stream (progress frames left out)."""
    with client.stream(
        "GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [data for kind, data in _frames(response.iter_lines()) if kind == "message"]


@contextlib.contextmanager
def _real_server(client: Any) -> Iterator[str]:
    """The same app served by a real uvicorn on loopback (TestClient buffers whole responses,
    so only a real server shows what a client receives while a stream is still open)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(client.app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=20, what="uvicorn")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _frames(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, data) of each SSE frame as it arrives."""
    kind = "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: ") :])
            kind = "message"


def test_sse_streams_until_final(client: Any) -> None:
    """Live delivery: each write below happens only after the stream showed the one before, so
    the stream must carry what is written while it is open, then end when the job ends."""
    job = _job(client)
    with session_factory()() as session:
        claimed = runs.claim_job(session, job["id"], "w1", 30)
        assert claimed is not None
        lease = runs.Lease(job["id"], "w1", claimed.lease_epoch)
    seen: list[tuple[str, Any]] = []
    with (
        _real_server(client) as url,
        httpx.stream(
            "GET",
            f"{url}/jobs/{job['id']}/events",
            headers={
                "Authorization": client.headers["Authorization"],
                "Accept": "text/event-stream",
            },
            timeout=30,
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = _frames(response.iter_lines())
        assert next(frames) == ("message", ANY_EVENT("job created"))
        with session_factory()() as session:  # written while the stream is open
            runs.add_event(session, lease, "info", "step 1", {"step": 1})
        assert next(frames) == ("message", ANY_EVENT("step 1"))
        with session_factory()() as session:
            runs.record_progress(
                session,
                lease,
                {"step": 1, "total_steps": 3, "train_loss": 2.5, "tokens_per_second": 123.0},
            )
        kind, progress = next(frames)
        assert kind == "progress"
        assert progress["status"] == "running" and progress["step"] == 1
        assert progress["train_loss"] == 2.5 and progress["tokens_per_second"] == 123.0
        with session_factory()() as session:
            runs.finish_job(session, lease, "failed", "oops", "it broke")
        seen = list(frames)  # the stream ends by itself once the job is final
    assert ("message", ANY_EVENT("job failed: it broke")) in seen
    assert seen[-1][0] == "progress" or seen[-1] == ("message", ANY_EVENT("job failed: it broke"))
    failed = client.get(f"/jobs/{job['id']}").json()
    assert failed["error"] == {"code": "oops", "message": "it broke"}


class ANY_EVENT:  # noqa: N801 - reads as a matcher in asserts
    """Equal to any event object with this message."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and other.get("message") == self.message

    def __repr__(self) -> str:
        return f"<event {self.message!r}>"


def test_sse_on_a_final_job_ends_at_once(client: Any) -> None:
    job = _job(client)
    client.post(f"/jobs/{job['id']}/cancel")
    messages = [e["message"] for e in _sse_events(client, job["id"])]
    assert messages == ["job created", "cancelled while queued"]


def test_sse_resumes_after_last_event_id(client: Any) -> None:
    job = _job(client)
    client.post(f"/jobs/{job['id']}/cancel")
    first = client.get(f"/jobs/{job['id']}/events").json()["data"][0]["id"]
    headers = {"Accept": "text/event-stream", "Last-Event-ID": str(first)}
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=headers) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert [json.loads(line[6:])["message"] for line in lines] == ["cancelled while queued"]
