"""Failures are classified over real processes: infrastructure is retried from the last
checkpoint with an event naming the cause, user errors fail at once with what to fix, and every
attempt's rank logs are kept and served."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.live import (
    chat_rows,
    deployment,
    descendants,
    job_body,
    upload,
    wait_final,
    wait_for,
)

ROWS = chat_rows(60)


def _step(http: httpx.Client, job_id: str) -> int:
    return int(http.get(f"/jobs/{job_id}/progress").json()["step"] or 0)


def _events(http: httpx.Client, job_id: str) -> list[str]:
    return [e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["data"]]


def _rank(worker_pid: int, rank: int) -> int | None:
    for pid in descendants(worker_pid):
        try:
            proc = psutil.Process(pid)
            engine = "worker.training.engine" in " ".join(proc.cmdline())
            if engine and proc.environ().get("RANK") == str(rank):
                return pid
        except psutil.Error:
            continue
    return None


def test_killed_rank_is_retried_and_logs_are_kept(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}, LORAFLEET_WORKER_PROCS="2") as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            # Long enough that the kill lands mid-run however fast the engine is.
            body = job_body(upload(http, ROWS), max_steps=60, checkpoint_every_steps=5)
            job_id = http.post("/jobs", json=body).json()["id"]
            worker = dep.start_worker()
            wait_for(lambda: _step(http, job_id) >= 7, 240, 0.1, "step 7")
            victim = wait_for(lambda: _rank(worker.pid, 1), 10, 0.1, "rank 1")
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(
                lambda: any(m.startswith("resumed from step") for m in _events(http, job_id)),
                180,
                0.3,
                "the retry to resume",
            )
            resumed_after = time.monotonic() - killed_at
            final = wait_final(http, job_id, timeout=300)
            events = _events(http, job_id)
            assert final["status"] == "succeeded", (final, events)
            assert final["attempts"] == 2
            retry = [m for m in events if "retrying from the last checkpoint" in m]
            assert retry and "rank 1 was killed by SIGKILL" in retry[0], events
            resumed = [m for m in events if m.startswith("resumed from step")]
            # From a committed checkpoint (a multiple of 5) taken before the kill.
            assert resumed[0] in (f"resumed from step {n} (attempt 2)" for n in range(5, 60, 5))
            # Both attempts' rank logs are kept and served, the failed one included.
            first = http.get(f"/jobs/{job_id}/logs", params={"attempt": 1})
            assert first.status_code == 200 and first.headers["x-attempt"] == "1"
            assert "==> rank0.log (attempt 1) <==" in first.text and "rank1.log" in first.text
            last = http.get(f"/jobs/{job_id}/logs")
            assert last.headers["x-attempt"] == "2"
            missing = http.get(f"/jobs/{job_id}/logs", params={"attempt": 9})
            assert missing.status_code == 404 and "kept: 1, 2" in missing.text
            other = dep.client(dep.create_key("mallory"))
            assert other.get(f"/jobs/{job_id}/logs").status_code == 404
        cli = dep.cli("logs", job_id, "--attempt", "1", "--api-url", dep.url, "--api-key", dep.key)
        assert cli.returncode == 0 and "rank1.log (attempt 1)" in cli.stdout, cli.stderr
        print(f"\nrank 1 SIGKILLed -> resumed on attempt 2 after {resumed_after:.1f}s")


def test_user_errors_fail_at_once_with_what_to_fix(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}, HF_HUB_OFFLINE="1") as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            file_id = upload(http, ROWS)
            refused = job_body(file_id, max_steps=5, precision="fp16")  # a GPU-only setting
            hub = {**job_body(file_id, max_steps=5), "base_model": "no-such-org/no-such-model"}
            hub["lora"] = {**hub["lora"], "target_modules": ["q_proj"]}
            jobs = [http.post("/jobs", json=b).json()["id"] for b in (refused, hub)]
            started = time.monotonic()
            dep.start_worker()
            finals = [wait_final(http, j, timeout=240) for j in jobs]
            took = time.monotonic() - started
        fp16, missing = finals
        assert fp16["status"] == "failed" and fp16["attempts"] == 1
        assert fp16["error"]["code"] == "invalid_job"
        assert "fp16 needs a GPU" in fp16["error"]["message"]
        assert missing["status"] == "failed" and missing["attempts"] == 1
        assert missing["error"]["code"] == "invalid_input"
        assert "cannot be resolved" in missing["error"]["message"]
        assert "LORAFLEET_MODELS_DIR" in missing["error"]["message"]
        print(f"\ntwo user errors failed at attempt 1 within {took:.1f}s of the worker start")


def test_out_of_memory_is_reported_with_the_setting_to_change(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # 150 MB is below what a rank needs just to import torch: the guard must end the job.
    with deployment(
        tmp_path, {"tiny": tiny_dir}, LORAFLEET_WORKER_MEMORY_LIMIT_BYTES=str(150 * 2**20)
    ) as dep:
        dep.key = dep.create_key("ops")
        dep.start_api()
        with dep.client() as http:
            job_id = http.post("/jobs", json=job_body(upload(http, ROWS))).json()["id"]
            dep.start_worker()
            final = wait_final(http, job_id, timeout=240)
        assert final["status"] == "failed" and final["attempts"] == 1
        assert final["error"]["code"] == "out_of_memory"
        message = final["error"]["message"]
        assert "LORAFLEET_WORKER_MEMORY_LIMIT_BYTES" in message and "batch_size" in message


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def test_disk_full_is_retried_once_space_is_back(
    tiny_dir: Path, tmp_path: Path, pg_schema: str
) -> None:
    work = tmp_path / "data" / "work"
    if not _mount_tmpfs(work, "96m"):
        pytest.skip("mount -t tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    filler = work / "filler"
    try:
        with deployment(
            tmp_path,
            {"tiny": tiny_dir},
            LORAFLEET_DATABASE_URL=pg_schema,  # only the work dir is on the small disk
            LORAFLEET_STORAGE_URL=f"file://{tmp_path / 'storage'}",
        ) as dep:
            dep.key = dep.create_key("ops")
            dep.start_api()
            with dep.client() as http:
                body = job_body(upload(http, ROWS), max_steps=60, checkpoint_every_steps=5)
                job_id = http.post("/jobs", json=body).json()["id"]
                dep.start_worker()
                wait_for(lambda: _step(http, job_id) >= 6, 240, 0.1, "step 6")
                _fill(filler)
                full_at = time.monotonic()

                def retried() -> Any:
                    found = [m for m in _events(http, job_id) if "retrying" in m]
                    return found[0] if found else None

                retry = wait_for(retried, 180, 0.3, "the disk-full retry")
                filler.unlink()
                final = wait_final(http, job_id, timeout=300)
            assert "disk full" in retry, retry
            assert final["status"] == "succeeded" and final["attempts"] == 2, final
            print(f"\ndisk full at step >=6 -> retry event after {time.monotonic() - full_at:.1f}s")
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)


def _fill(path: Path) -> None:
    """Take every free byte of the file system holding ``path`` (unbuffered: nothing is left
    to flush at close)."""
    with open(path, "wb", buffering=0) as stream:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    stream.write(b"\0" * size)
            except OSError:
                pass
