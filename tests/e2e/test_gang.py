"""Multi-node jobs over real processes: two `lorafleet worker`s on one host (CPU, gloo, one rank
each) train one job as one world of 2, and a member killed mid-run costs one attempt, no more.

The reference is the same body trained by ``lorafleet train --nproc 2``: one host, 2 processes,
the same global batch (batch_size x world size). The gang must give the same adapter: the ranks
see the same rows in the same order and the gradients are reduced the same way, only the
transport between the ranks differs (two workers' process groups joined by torch's rendezvous).
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.live import (
    Deployment,
    alive,
    chat_rows,
    deployment,
    descendants,
    job_body,
    upload,
    wait_final,
    wait_for,
)

ROWS = chat_rows(48)
BODY = {"max_steps": 16, "checkpoint_every_steps": 4, "batch_size": 2}
GANG = {
    "LORAFLEET_WORKER_PROCS": "1",
    "LORAFLEET_WORKER_ADDRESS": "127.0.0.1",
    "LORAFLEET_GANG_WAIT_SECONDS": "60",
}
TOLERANCE = 1e-5  # max |difference| of any adapter weight


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, torch.Tensor]:
    """The same job trained by one host with 2 processes (`lorafleet train --nproc 2`)."""
    import subprocess
    import sys

    from tests.e2e.live import REPO

    folder = tmp_path_factory.mktemp("gang-reference")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    body = {**job_body("train.jsonl", model=str(tiny_dir), **BODY)}
    (folder / "job.json").write_text(json.dumps(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "train", "job.json", "--out", "out", "--nproc", "2"],
        cwd=folder,
        env={**env, "PYTHONPATH": str(REPO), "LORAFLEET_DATA_DIR": str(folder / "data")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    return load_file(str(folder / "out" / "adapter_model.safetensors"))


@pytest.fixture
def fleet(tmp_path: Path, tiny_dir: Path, pg_schema: str) -> Iterator[tuple[Deployment, Any]]:
    """API + two CPU workers of one rank each, on PostgreSQL; yields (deployment, admin)."""
    with deployment(tmp_path, {"tiny": tiny_dir}, LORAFLEET_DATABASE_URL=pg_schema, **GANG) as dep:
        dep.key = dep.create_key("alice")
        dep.start_api()
        admin = dep.client(dep.create_key("ops", admin=True))
        dep.start_worker("worker-a")
        dep.start_worker("worker-b")
        wait_for(lambda: len(_workers(admin)) == 2, 120, 0.5, "two workers to register")
        try:
            yield dep, admin
        finally:
            admin.close()


def _workers(admin: httpx.Client) -> list[dict[str, Any]]:
    return list(admin.get("/workers").json()["data"])


def _events(http: httpx.Client, job_id: str) -> list[str]:
    return [e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["data"]]


def _step(http: httpx.Client, job_id: str) -> int:
    return int(http.get(f"/jobs/{job_id}/progress").json()["step"] or 0)


def _adapter(http: httpx.Client, job_id: str, into: Path) -> tuple[dict[str, Any], Path]:
    blob = http.get(f"/jobs/{job_id}/adapter").content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    manifest = json.loads((into / "adapter" / "manifest.json").read_text())
    return manifest, into / "adapter" / "adapter_model.safetensors"


def _global_ranks(pid: int) -> list[str]:
    """RANK of each training process under ``pid``."""
    import psutil

    found = []
    for child in descendants(pid):
        try:
            rank = psutil.Process(child).environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found.append(rank)
    return found


def _max_diff(reference: dict[str, torch.Tensor], path: Path) -> float:
    served = load_file(str(path))
    assert served.keys() == reference.keys()
    return max(float((reference[k] - served[k]).abs().max()) for k in reference)


def test_two_workers_train_one_world(
    fleet: tuple[Deployment, Any], reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    dep, admin = fleet
    with dep.client() as http:
        file_id = upload(http, ROWS)
        # Three nodes on a fleet of two: refused at submit, saying why.
        refused = http.post("/jobs", json={**job_body(file_id, **BODY), "resources": {"nodes": 3}})
        assert refused.status_code == 422, refused.text
        assert "resources.nodes" in refused.text and "needs 3 workers at once" in refused.text
        started = time.monotonic()
        job = http.post("/jobs", json={**job_body(file_id, **BODY), "resources": {"nodes": 2}})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]

        def both_in_it() -> list[dict[str, Any]] | None:
            busy = [w for w in _workers(admin) if w["current_job"] == job_id]
            return busy if len(busy) == 2 else None

        wait_for(both_in_it, 120, 0.3, "both workers in the gang")
        running = wait_for(
            lambda: (j := http.get(f"/jobs/{job_id}").json())["status"] == "running" and j,
            120,
            0.3,
            "the gang to start",
        )
        assert len(running["workers"]) == 2
        assert set(running["workers"]) == {w["id"] for w in _workers(admin)}
        final = wait_final(http, job_id, timeout=400)
        took = time.monotonic() - started
        assert final["status"] == "succeeded", (final, dep.log("worker-a"), dep.log("worker-b"))
        assert final["attempts"] == 1 and final["workers"] == running["workers"]
        events = _events(http, job_id)
        assert any(m.startswith("gang of 2 workers formed") for m in events), events
        assert sum(m.startswith("node ") and " started on " in m for m in events) == 2, events
        manifest, weights = _adapter(http, job_id, tmp_path / "served")
        assert manifest["world_size"] == 2 and manifest["steps"] == BODY["max_steps"]
        assert manifest["effective_batch"] == BODY["batch_size"] * 2
        diff = _max_diff(reference, weights)
        logs = http.get(f"/jobs/{job_id}/logs").text
        assert "rank0" in logs and "rank1" in logs, logs[:500]
    wait_for(
        lambda: all(w["status"] == "idle" and not w["current_job"] for w in _workers(admin)),
        30,
        0.5,
        "workers idle",
    )
    print(f"\n2 workers x 1 rank: submit -> succeeded {took:.1f}s; max |adapter diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_killed_member_the_gang_resumes_on_new_members(
    fleet: tuple[Deployment, Any], reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """SIGKILL node 0's worker (it hosts the rendezvous): node 1's ranks end too (no orphan on
    either side), the reaper requeues the gang, and a new gang (node 1's worker and a fresh one)
    resumes from the last checkpoint to the same adapter."""
    dep, admin = fleet
    with dep.client() as http:
        body = {**job_body(upload(http, ROWS), **BODY), "resources": {"nodes": 2}}
        job_id = http.post("/jobs", json=body).json()["id"]
        wait_for(lambda: _step(http, job_id) >= 6, 240, 0.1, "step 6")
        first = http.get(f"/jobs/{job_id}").json()["workers"]
        # Node 0's worker is the one whose training process runs global rank 0.
        workers = dep.procs[1:]
        killed = next(p for p in workers if "0" in _global_ranks(p.pid))
        survivor = next(p for p in workers if p is not killed)
        ranks = {"killed": descendants(killed.pid), "survivor": descendants(survivor.pid)}
        assert ranks["killed"] and ranks["survivor"], "both workers should be training"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not alive(ranks["killed"]), 15, 0.2, "node 0's ranks to die with it")
        wait_for(lambda: not alive(ranks["survivor"]), 60, 0.2, "node 1's ranks to end")
        dep.start_worker("worker-c")
        resumed = wait_for(
            lambda: [m for m in _events(http, job_id) if m.startswith("resumed from step")],
            240,
            0.3,
            "the new gang to resume",
        )
        resumed_after = time.monotonic() - killed_at
        final = wait_final(http, job_id, timeout=400)
        assert final["status"] == "succeeded", (final, _events(http, job_id))
        assert final["attempts"] >= 2
        assert resumed[0].endswith(f"(attempt {final['attempts']})"), resumed
        step = int(resumed[0].split()[3])
        assert 4 <= step <= 8  # the last checkpoint before the kill (every 4 steps)
        assert first[0] not in final["workers"] and len(final["workers"]) == 2
        events = _events(http, job_id)
        assert any("gang member lost" in m or "collective" in m for m in events), events
        manifest, weights = _adapter(http, job_id, tmp_path / "served")
        assert manifest["world_size"] == 2
        diff = _max_diff(reference, weights)
    for proc in dep.procs[1:]:
        if proc.poll() is None:
            wait_for(lambda p=proc: not descendants(p.pid), 30, 0.3, "no training process left")
    print(
        f"\nnode 0 killed at step >= 6 -> resumed from step {step} after {resumed_after:.1f}s; "
        f"attempts {final['attempts']}; max |adapter diff| {diff:.2e}"
    )
    assert diff < TOLERANCE
