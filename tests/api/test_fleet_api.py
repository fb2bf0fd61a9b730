"""``GET /workers`` (admin only), ``POST /estimate`` and ``GET /metrics`` over the real app."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from shared.db import session_factory
from shared.models import Worker, utcnow
from shared.services import fleet, keys, runs
from tests.conftest import CHAT_ROWS, jsonl


def _admin_headers() -> dict[str, str]:
    with session_factory()() as s:
        key, _ = keys.create_key(s, "ops", admin=True)
    return {"Authorization": f"Bearer {key}"}


def _workers() -> None:
    with session_factory()() as s:
        fleet.register_worker(s, "gpu-1@a", "a", 2, "NVIDIA A100", 80 * 1024**3, 2, "0.1.0")
        fleet.register_worker(s, "cpu-1@b", "b", 0, None, None, 1, "0.1.0")
        fleet.register_worker(s, "old@c", "c", 0, None, None, 1, "0.0.9")
        s.execute(
            update(Worker)
            .where(Worker.id == "old@c")
            .values(last_heartbeat=utcnow() - timedelta(hours=1), status="busy")
        )
        s.commit()


def test_workers_admin_only_and_stale_flagged(client: Any) -> None:
    _workers()
    assert client.get("/workers").status_code == 403
    response = client.get("/workers", headers=_admin_headers())
    assert response.status_code == 200
    rows = {w["id"]: w for w in response.json()["data"]}
    assert set(rows) == {"gpu-1@a", "cpu-1@b", "old@c"}
    assert rows["gpu-1@a"] | {"last_heartbeat": None} == {
        "id": "gpu-1@a",
        "hostname": "a",
        "gpus": 2,
        "gpu_type": "NVIDIA A100",
        "gpu_memory_bytes": 80 * 1024**3,
        "host_memory_bytes": None,
        "procs": 2,
        "status": "idle",
        "current_job": None,
        "last_heartbeat": None,
        "version": "0.1.0",
        "devices": [],
    }
    assert rows["old@c"]["status"] == "offline"


DEVICE = {  # a heartbeat as an H100 worker sends it (no GPU here: the numbers are given)
    "index": 0,
    "uuid": "GPU-1111",
    "memory_used_bytes": 30 * 1024**3,
    "memory_total_bytes": 80 * 1024**3,
    "utilization_percent": 87.0,
}


def test_live_gpu_use_in_workers_and_metrics(client: Any) -> None:
    _workers()
    with session_factory()() as s:
        fleet.heartbeat_worker(s, "gpu-1@a", None, None, [DEVICE])
        fleet.heartbeat_worker(s, "cpu-1@b", None, None, [])
    rows = {w["id"]: w for w in client.get("/workers", headers=_admin_headers()).json()["data"]}
    assert rows["gpu-1@a"]["devices"] == [DEVICE]
    assert rows["cpu-1@b"]["devices"] == []  # a CPU worker reports no device at all
    text = client.get("/metrics", headers=_admin_headers()).text
    samples = {
        (s.name, s.labels.get("worker")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    labels = ("lorafleet_worker_gpu_memory_used_bytes", "gpu-1@a")
    assert samples[labels] == 30 * 1024**3
    assert samples[("lorafleet_worker_gpu_utilization_ratio", "gpu-1@a")] == 0.87
    assert not any(worker == "cpu-1@b" and "gpu" in name for name, worker in samples)


def test_estimate_and_submit_refusals(client: Any) -> None:
    file_id = client.post(
        "/files", files={"file": ("t.jsonl", jsonl(CHAT_ROWS), "application/jsonl")}
    ).json()["id"]
    body: dict[str, Any] = {"base_model": "tiny", "training_file": file_id}
    answer = client.post("/estimate", json=body).json()
    assert answer["parameters"]["trainable"] > 0 and answer["fits"] is None
    assert answer["tokens_per_epoch"] > 0 and answer["memory_bytes"]["total"] > 0
    assert client.post("/estimate", json={"base_model": "tiny"}).status_code == 200
    bad = client.post("/estimate", json={**body, "lora": {"target_modules": ["c_attn"]}})
    assert bad.status_code == 422 and "lora.target_modules" in bad.text and "q_proj" in bad.text
    bad = client.post("/jobs", json={**body, "lora": {"target_modules": ["c_attn"]}})
    assert bad.status_code == 422 and "lora.target_modules" in bad.text

    _workers()
    assert client.post("/estimate", json=body).json()["fits"] is True
    refused = client.post("/jobs", json={**body, "resources": {"gpus": 8}})
    assert refused.status_code == 422
    assert "8 GPUs requested but the largest worker has 2" in refused.text
    refused = client.post("/jobs", json={**body, "resources": {"gpu_type": "H100"}})
    assert refused.status_code == 422 and "resources.gpu_type" in refused.text
    assert client.post("/jobs", json={**body, "resources": {"gpu_type": "a100"}}).status_code == 201


def test_metrics_parse(client: Any) -> None:
    _workers()
    file_id = client.post(
        "/files", files={"file": ("t.jsonl", jsonl(CHAT_ROWS), "application/jsonl")}
    ).json()["id"]
    job = client.post("/jobs", json={"base_model": "tiny", "training_file": file_id}).json()
    with session_factory()() as s:
        runs.claim_job(s, job["id"], "cpu-1@b", 30)
        runs.finish_job(s, runs.Lease(job["id"], "cpu-1@b", 1), "succeeded", trained_tokens=1234)
    client.post("/jobs", json={"base_model": "tiny", "training_file": file_id})
    text = client.get("/metrics", headers=_admin_headers()).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {
        (f.name, s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert value[("lorafleet_jobs", "lorafleet_jobs", (("state", "queued"),))] == 1
    assert value[("lorafleet_jobs", "lorafleet_jobs", (("state", "succeeded"),))] == 1
    assert value[("lorafleet_queue_depth", "lorafleet_queue_depth", (("queue", "lorafleet"),))] == 1
    assert value[("lorafleet_trained_tokens", "lorafleet_trained_tokens_total", ())] == 1234
    assert families["lorafleet_job_duration_seconds"].type == "histogram"
    count = ("lorafleet_job_duration_seconds", "lorafleet_job_duration_seconds_count")
    assert value[(*count, (("state", "succeeded"),))] == 1
    wait = ("lorafleet_job_queue_wait_seconds", "lorafleet_job_queue_wait_seconds_count", ())
    assert value[wait] == 1
    assert value[("lorafleet_workers", "lorafleet_workers", (("status", "offline"),))] == 1
    assert value[("lorafleet_workers", "lorafleet_workers", (("status", "idle"),))] == 2
    memory = families["lorafleet_worker_gpu_memory_bytes"].samples
    assert [(s.labels["worker"], s.value) for s in memory] == [("gpu-1@a", 80 * 1024**3)]


def test_default_target_modules_follow_the_model(client: Any, settings: Any) -> None:
    """A job that names no target_modules gets the model's attention projections."""
    from worker.tiny_models import make_tiny_gpt2

    make_tiny_gpt2(settings.models_dir / "gpt2")
    file_id = client.post(
        "/files", files={"file": ("t.jsonl", jsonl(CHAT_ROWS), "application/jsonl")}
    ).json()["id"]
    gpt2 = client.post("/jobs", json={"base_model": "gpt2", "training_file": file_id})
    assert gpt2.status_code == 201, gpt2.text
    assert gpt2.json()["lora"]["target_modules"] == ["c_attn"]
    llama = client.post("/jobs", json={"base_model": "tiny", "training_file": file_id})
    assert llama.json()["lora"]["target_modules"] == ["q_proj", "v_proj"]
    answer = client.post("/estimate", json={"base_model": "gpt2"})
    assert answer.status_code == 200 and answer.json()["parameters"]["trainable"] > 0
    explicit = client.post(
        "/jobs", json={"base_model": "gpt2", "training_file": file_id, "lora": {"r": 4}}
    )
    assert explicit.json()["lora"] | {"r": 4} == explicit.json()["lora"]
    assert explicit.json()["lora"]["target_modules"] == ["c_attn"]


def test_estimate_reports_both_strategies_and_submit_follows_auto(
    client: Any, settings: Any
) -> None:
    """A 6.7B model (header-only weights) on a fleet of 8 x 16 GiB GPUs: a replica does not fit
    one GPU, 8 shards do. auto is accepted (and would shard), ddp is refused saying fsdp would
    fit, and a job too big for both is refused as before."""
    from tests.shared.test_estimate import write_sparse_llama

    write_sparse_llama(settings.models_dir / "big")
    with session_factory()() as s:
        fleet.register_worker(s, "gpu-8@a", "a", 8, "NVIDIA A100", 16 * 1024**3, 8, "0.1.0")
    file_id = client.post(
        "/files", files={"file": ("t.jsonl", jsonl(CHAT_ROWS), "application/jsonl")}
    ).json()["id"]
    training = {"batch_size": 1, "max_seq_length": 512}
    body: dict[str, Any] = {"base_model": "big", "training_file": file_id, "training": training}
    answer = client.post("/estimate", json=body).json()
    assert answer["strategy"] == "fsdp" and answer["fits"] is True and answer["world_size"] == 8
    per_strategy = answer["strategies"]
    assert per_strategy["ddp"]["fits"] is False and per_strategy["fsdp"]["fits"] is True
    assert answer["memory_bytes"] == per_strategy["fsdp"]["memory_bytes"]
    ddp_weights = per_strategy["ddp"]["memory_bytes"]["weights"]
    assert per_strategy["fsdp"]["memory_bytes"]["weights"] < ddp_weights / 4

    created = client.post("/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["training"]["strategy"] == "auto" and job["strategy"] is None  # until it runs
    ddp = {**body, "training": {**training, "strategy": "ddp"}}
    refused = client.post("/jobs", json=ddp)
    assert refused.status_code == 422 and "set training.strategy to fsdp or auto" in refused.text
    huge = {**body, "training": {**training, "batch_size": 64, "max_seq_length": 4096}}
    refused = client.post("/jobs", json=huge)
    assert refused.status_code == 422 and "fits on no worker's GPU" in refused.text
    bad = client.post("/jobs", json={**body, "training": {**training, "strategy": "zero3"}})
    assert bad.status_code == 422 and "strategy" in bad.text
