"""The product path over real processes: uvicorn API, Celery worker, database, broker, storage.

Once on the embedded defaults (SQLite, filesystem broker, local folder) and once on production
parts (PostgreSQL, Redis, S3 served by moto's real HTTP server in a thread).
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load
from transformers import AutoModelForCausalLM

from shared.spec import JobSpec
from tests.e2e.live import chat_rows, deployment, job_body, upload, wait_final, wait_for
from worker.training.engine import LoraTrainer, TrainPaths

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def s3_url() -> Iterator[tuple[str, str]]:
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.e2e.live import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket="lorafleet")
    yield "s3://lorafleet/artifacts", endpoint
    server.stop()


def _adapter_from_tarball(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {
            m.name.split("/")[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _user_path(dep, tiny_dir: Path, tmp_path: Path, procs: int = 1, strategy: str = "auto") -> None:
    """Upload, create, watch progress and events, download, load with peft, and compare with
    the engine run alone on the same global batch (``procs`` ranks in the worker, replicas or
    shards by ``strategy``; auto is ddp for a model this small)."""
    rows = chat_rows(40)
    with dep.client() as http:
        file_id = upload(http, rows)
        body = job_body(file_id, max_steps=12, checkpoint_every_steps=5, strategy=strategy)
        created = http.post("/jobs", json=body)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["status"] == "queued" and job["attempts"] == 0 and job["strategy"] is None
        steps_seen = set()

        def progressed() -> bool:
            progress = http.get(f"/jobs/{job['id']}/progress").json()
            if progress["step"]:
                steps_seen.add(progress["step"])
            return progress["status"] in ("succeeded", "failed")

        wait_for(progressed, 240, 0.2, "progress")
        # SSE: the stream replays events and ends when the job is final
        with http.stream(
            "GET", f"/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            messages = [
                json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")
            ]
        final = wait_final(http, job["id"])
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 1 and final["trained_tokens"] > 0
        used = "fsdp" if strategy == "fsdp" else "ddp"
        assert final["strategy"] == used and final["training"]["strategy"] == strategy
        assert http.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"
        assert any("succeeded" in m["message"] for m in messages)
        assert any("checkpoint saved at step 5" in m["message"] for m in messages)
        metrics = http.get(f"/jobs/{job['id']}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == list(range(1, 13))
        assert http.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
        download = http.get(f"/jobs/{job['id']}/adapter")
        assert download.status_code == 200
        files = _adapter_from_tarball(download.content)
    import hashlib

    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-checksum-sha256"]
    manifest = json.loads(files["manifest.json"])
    assert manifest["world_size"] == procs and manifest["strategy"] == used
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hashlib.sha256(files[name]).hexdigest() == manifest["files"][name]
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(folder))

    # The worker's result equals the engine run alone with the same spec and seed.
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = {**body["training"], "batch_size": body["training"]["batch_size"] * procs}
    spec = JobSpec.model_validate({**body, "training": single, "training_file": str(train)})
    trainer = LoraTrainer(spec, TrainPaths(model=str(tiny_dir), output_dir=tmp_path / "local"))
    trainer.setup()
    trainer.train()
    local = load((tmp_path / "local" / "adapter_model.safetensors").read_bytes())
    served = load(files["adapter_model.safetensors"])
    assert max(float((local[k] - served[k]).abs().max()) for k in local) < 1e-6
    assert len(steps_seen) >= 2  # progress moved while we watched
    assert torch.is_tensor(next(iter(served.values())))


def test_embedded_defaults_end_to_end(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("alice")
        dep.start_api()
        dep.start_worker()
        _user_path(dep, tiny_dir, tmp_path)


def test_postgres_redis_s3_end_to_end(
    tiny_dir: Path, tmp_path: Path, pg_schema: str, s3_url: tuple[str, str]
) -> None:
    storage, endpoint = s3_url
    env = {
        "LORAFLEET_DATABASE_URL": pg_schema,
        "LORAFLEET_BROKER_URL": f"redis://127.0.0.1:6379/{secrets.randbelow(10) + 3}",
        "LORAFLEET_STORAGE_URL": storage,
        "LORAFLEET_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAFLEET_WORKER_PROCS": "2",  # FSDP2 over 2 gloo ranks inside the service
    }
    with deployment(tmp_path, {"tiny": tiny_dir}, **env) as dep:
        dep.key = dep.create_key("bob")
        dep.start_api()
        dep.start_worker()
        _user_path(dep, tiny_dir, tmp_path, procs=2, strategy="fsdp")


def test_cancel_failures_and_bad_input(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("carol")
        dep.start_api()
        with dep.client() as http:
            file_id = upload(http, chat_rows(30))
            # queued job cancelled before any worker exists: it never starts
            queued = http.post("/jobs", json=job_body(file_id)).json()
            cancelled = http.post(f"/jobs/{queued['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            # unknown model -> 422 at submit, naming the field
            bad = http.post("/jobs", json=job_body(file_id, model="no-such-model"))
            assert bad.status_code == 422 and "base_model" in bad.text
            bad = http.post("/jobs", json={**job_body(file_id), "training": {"batch_size": 0}})
            assert bad.status_code == 422 and "batch_size" in bad.text
            assert http.get("/jobs/ftjob-doesnotexist").status_code == 404
            assert http.get("/files/file-doesnotexist").status_code == 404
            # a job that fails in training (target module missing in the model)
            failing = http.post(
                "/jobs",
                json={**job_body(file_id), "lora": {"target_modules": ["nope_proj"]}},
            )
            long_job = http.post(
                "/jobs", json=job_body(file_id, max_steps=400, checkpoint_every_steps=50)
            ).json()
            dep.start_worker()
            if failing.status_code == 201:  # not refused at submit: must fail cleanly
                failed = wait_final(http, failing.json()["id"])
                assert failed["status"] == "failed"
                assert "nope_proj" in failed["error"]["message"]
            else:
                assert failing.status_code == 422 and "target_modules" in failing.text
            # running job cancelled: stops within seconds, its processes end
            wait_for(
                lambda: (http.get(f"/jobs/{long_job['id']}/progress").json()["step"] or 0) > 2,
                180,
                0.3,
                "long job to run",
            )
            assert http.post(f"/jobs/{long_job['id']}/cancel").status_code == 200
            done = wait_final(http, long_job["id"], timeout=30)
            assert done["status"] == "cancelled"
            assert http.get(f"/jobs/{long_job['id']}/adapter").status_code == 409
            # the worker is healthy and takes the next job
            after = http.post("/jobs", json=job_body(file_id)).json()
            assert wait_final(http, after["id"])["status"] == "succeeded"
            assert http.get(f"/jobs/{queued['id']}").json()["started_at"] is None


def test_jobs_list_pagination_and_filter(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("dave")
        dep.start_api()
        with dep.client() as http:
            file_id = upload(http, chat_rows(5))
            ids = [http.post("/jobs", json=job_body(file_id)).json()["id"] for _ in range(5)]
            page = http.get("/jobs", params={"limit": 2}).json()
            assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
            rest = http.get("/jobs", params={"limit": 10, "after": page["data"][-1]["id"]}).json()
            assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
            http.post(f"/jobs/{ids[0]}/cancel")
            cancelled = http.get("/jobs", params={"status": "cancelled"}).json()["data"]
            assert [j["id"] for j in cancelled] == [ids[0]]
            assert httpx.get(dep.url + "/jobs").status_code == 401
