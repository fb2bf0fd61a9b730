"""Crash safety over real processes: SIGKILLed workers, a restarted Redis, duplicate deliveries,
concurrent idempotent submits. The database row is the truth; nothing accepted is ever lost."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from safetensors.torch import load_file

from shared.spec import JobSpec
from tests.e2e.live import (
    Deployment,
    alive,
    chat_rows,
    deployment,
    descendants,
    free_port,
    job_body,
    upload,
    wait_final,
    wait_for,
)
from worker.training.engine import LoraTrainer, TrainPaths

ROWS = chat_rows(60)
# Long enough that both kills land mid-run however fast the engine is (100 steps could end
# between the test seeing step 50 and its kill on a loaded machine).
LONG = {"max_steps": 300, "checkpoint_every_steps": 15, "batch_size": 2}


def _step(http: httpx.Client, job_id: str) -> int:
    return int(http.get(f"/jobs/{job_id}/progress").json()["step"] or 0)


def _kill_worker_mid_run(
    dep: Deployment, http: httpx.Client, job_id: str, after_step: int
) -> tuple[int, int]:
    """SIGKILL the worker once training passed ``after_step``; its ranks must die with it.
    Returns the last step the database had recorded and the newest checkpoint committed before
    the kill (a checkpoint whose upload was still in flight is not committed: the retry must not
    use it, so it may cost one more interval)."""
    worker = dep.procs[-1]
    wait_for(lambda: _step(http, job_id) > after_step, 240, 0.1, f"step > {after_step}")
    children = descendants(worker.pid)
    assert children, "the worker should have training processes"
    assert http.get(f"/jobs/{job_id}").json()["status"] == "running", "the kill must land mid-run"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_for(lambda: not alive(children), 15, 0.2, "training processes to die with the worker")
    checkpoints = http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    return _step(http, job_id), max((c["step"] for c in checkpoints), default=0)


def _reference_adapter(tmp: Path, tiny_dir: Path, body: dict) -> dict:
    train = tmp / "reference.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = JobSpec.model_validate({**body, "training_file": str(train)})
    trainer = LoraTrainer(spec, TrainPaths(model=str(tiny_dir), output_dir=tmp / "reference"))
    trainer.setup()
    trainer.train()
    return load_file(str(tmp / "reference" / "adapter_model.safetensors"))


def _events(http: httpx.Client, job_id: str) -> list[str]:
    return [e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["data"]]


def test_sigkill_twice_resumes_from_checkpoints(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            body = job_body(upload(http, ROWS), **LONG)
            job = http.post("/jobs", json=body).json()
            dep.start_worker("worker-1")
            kills = [_kill_worker_mid_run(dep, http, job["id"], after_step=20)]
            killed_at = time.monotonic()
            dep.start_worker("worker-2")
            wait_for(
                lambda: any("(attempt 2)" in m for m in _events(http, job["id"])),
                120,
                0.3,
                "attempt 2 to resume",
            )
            resumed_after = time.monotonic() - killed_at
            kills.append(_kill_worker_mid_run(dep, http, job["id"], after_step=50))
            dep.start_worker("worker-3")
            final = wait_final(http, job["id"], timeout=300)
            events = _events(http, job["id"])
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 3
        resumed = [m for m in events if m.startswith("resumed from step")]
        assert len(resumed) == 2, events
        steps = [int(m.split()[3]) for m in resumed]
        killed_steps = [k for k, _ in kills]
        # Each retry resumes from exactly the newest checkpoint committed before its kill...
        assert steps == [c for _, c in kills], (steps, kills)
        assert steps[0] >= 15 and steps[1] > steps[0]
        lost = [k - s for k, s in zip(killed_steps, steps, strict=True)]
        print(
            f"\nkill -> 'resumed' event: {resumed_after:.1f}s; killed at {killed_steps}, "
            f"resumed at {steps}: steps lost {lost} (checkpoint every 15)"
        )
        # ...so a kill costs at most the interval plus the one checkpoint still uploading.
        assert all(0 <= n < 2 * 15 for n in lost)
        served = load_file(str(_download(dep, job["id"], tmp_path)))
    reference = _reference_adapter(tmp_path, tiny_dir, body)
    assert max(float((reference[k] - served[k]).abs().max()) for k in reference) < 1e-5


def _download(dep: Deployment, job_id: str, tmp: Path) -> Path:
    import io
    import tarfile

    with dep.client() as http:
        blob = http.get(f"/jobs/{job_id}/adapter").content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp / "served", filter="data")
    return tmp / "served" / "adapter" / "adapter_model.safetensors"


def test_exceeding_max_attempts_fails_clearly(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            body = {**job_body(upload(http, ROWS), **LONG), "max_attempts": 1}
            job = http.post("/jobs", json=body).json()
            dep.start_worker("worker-1")
            _kill_worker_mid_run(dep, http, job["id"], after_step=5)
            dep.start_worker("worker-2")
            final = wait_final(http, job["id"], timeout=120)
        assert final["status"] == "failed"
        assert final["error"]["code"] == "max_attempts_exceeded"
        assert "attempt" in final["error"]["message"]


def test_redis_restart_loses_no_queued_job_and_duplicates_train_once(
    tiny_dir: Path, tmp_path: Path
) -> None:
    port = free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: _redis_ping(port), 10, 0.1, "redis")
        return proc

    redis_proc = start_redis()
    try:
        with deployment(
            tmp_path, {"tiny": tiny_dir}, LORAFLEET_BROKER_URL=f"redis://127.0.0.1:{port}/0"
        ) as dep:
            dep.key = dep.create_key("ops")
            dep.start_api()
            with dep.client() as http:
                file_id = upload(http, chat_rows(10))
                jobs = [http.post("/jobs", json=job_body(file_id)).json()["id"] for _ in range(3)]
                # Redis restarts without persistence: every queued message is gone.
                redis_proc.terminate()
                redis_proc.wait()
                redis_proc = start_redis()
                # ...and one job gets delivered twice on top.
                from shared.config import Settings
                from shared.queueing import make_celery

                publisher = make_celery(
                    Settings(data_dir=tmp_path / "data", broker_url=f"redis://127.0.0.1:{port}/0")
                )
                for _ in range(2):
                    publisher.send_task("lorafleet.train_job", args=[jobs[0]], queue="lorafleet")
                dep.start_worker()
                finals = [wait_final(http, job_id, timeout=240) for job_id in jobs]
                assert [f["status"] for f in finals] == ["succeeded"] * 3
                assert all(f["attempts"] == 1 for f in finals)
                started = [m for m in _events(http, jobs[0]) if m.startswith("started on")]
                assert len(started) == 1
    finally:
        redis_proc.terminate()
        redis_proc.wait()


def _redis_ping(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_concurrent_idempotent_submits_make_exactly_one_job_each(
    tiny_dir: Path, tmp_path: Path
) -> None:
    with deployment(
        tmp_path, {"tiny": tiny_dir}, LORAFLEET_MAX_ACTIVE_JOBS_PER_OWNER="1000"
    ) as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            file_id = upload(http, chat_rows(5))
        body = job_body(file_id)
        keys = [secrets.token_hex(8) for _ in range(200)]

        def submit(key: str) -> tuple[int, str]:
            with dep.client() as http:
                response = http.post("/jobs", json=body, headers={"Idempotency-Key": key})
                return response.status_code, response.json()["id"]

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(submit, keys + keys))
        assert all(code in (200, 201) for code, _ in results), results[:5]
        first, second = results[:200], results[200:]
        assert [i for _, i in first] == [i for _, i in second]
        with dep.client() as http:
            listed, after = [], None
            while True:
                params = {"limit": 100, **({"after": after} if after else {})}
                page = http.get("/jobs", params=params).json()
                listed += page["data"]
                if not page["has_more"]:
                    break
                after = page["data"][-1]["id"]
            assert len({j["id"] for j in listed}) == 200
            # same key, another body: refused
            clash = http.post(
                "/jobs", json={**body, "priority": 5}, headers={"Idempotency-Key": keys[0]}
            )
            assert clash.status_code in (409, 422)


def test_sigterm_drains_checkpoints_and_hands_the_job_back(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            body = job_body(upload(http, ROWS), **LONG)
            job = http.post("/jobs", json=body).json()
            dep.start_worker("worker-1")
            worker = dep.procs[-1]
            wait_for(lambda: _step(http, job["id"]) > 8, 240, 0.1, "training")
            children = descendants(worker.pid)
            os.kill(worker.pid, signal.SIGTERM)  # warm shutdown = drain
            worker.wait(timeout=60)
            assert not alive(children)
            requeued = http.get(f"/jobs/{job['id']}").json()
            assert requeued["status"] == "queued" and requeued["attempts"] == 0
            drained = [m for m in _events(http, job["id"]) if m.startswith("worker draining")]
            assert drained and "checkpointed at step" in drained[0]
            step = int(drained[0].split("step ")[1].split(";")[0])
            assert step > 8  # the step it was on when asked, not an older periodic checkpoint
            dep.start_worker("worker-2")
            final = wait_final(http, job["id"], timeout=240)
            assert final["status"] == "succeeded" and final["attempts"] == 1
            assert f"resumed from step {step} (attempt 1)" in _events(http, job["id"])
