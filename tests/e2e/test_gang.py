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
from datetime import datetime
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
    signal_tree,
    tree,
    upload,
    wait_final,
    wait_for,
)

# One fleet for the module: its tests must run in one xdist worker.
pytestmark = pytest.mark.xdist_group("gang-" + __name__)

ROWS = chat_rows(48)
# Enough steps that the second fault still finds the job running after the first resume (with
# one thread per rank 32 steps sometimes ended before the test could freeze node 1).
BODY = {"max_steps": 80, "checkpoint_every_steps": 8, "batch_size": 2}
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


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path
) -> Iterator[tuple[Deployment, Any]]:
    """API + two CPU workers of one rank each, on PostgreSQL, shared by this module's tests;
    yields (deployment, admin client)."""
    import secrets

    from sqlalchemy import create_engine, text

    base = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    schema = f"e2e_gang_{secrets.token_hex(4)}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{base}?options=-csearch_path%3D{schema}"
    root = tmp_path_factory.mktemp("gang")
    try:
        with deployment(root, {"tiny": tiny_dir}, LORAFLEET_DATABASE_URL=url, **GANG) as dep:
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
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


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
        # Cancel stops every member: both workers' ranks end, the job ends cancelled.
        doomed = http.post(
            "/jobs", json={**job_body(file_id, **BODY), "resources": {"nodes": 2}}
        ).json()["id"]
        wait_for(lambda: all(descendants(p.pid) for p in dep.procs[1:]), 120, 0.2, "gang ranks")
        assert http.post(f"/jobs/{doomed}/cancel").status_code == 200
        assert wait_final(http, doomed, timeout=60)["status"] == "cancelled"
        for proc in dep.procs[1:]:
            wait_for(lambda p=proc: not descendants(p.pid), 30, 0.2, "every rank to end")

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


def _timeline(http: httpx.Client, job_id: str) -> str:
    rows = http.get(f"/jobs/{job_id}/events").json()["data"]
    start = datetime.fromisoformat(rows[0]["created_at"])
    return "\n".join(
        f"  {(datetime.fromisoformat(e['created_at']) - start).total_seconds():6.1f}s "
        f"{e['message'][:110]}"
        for e in rows
    )


def _spare_workers(dep: Deployment, admin: httpx.Client, *names: str) -> None:
    """More idle workers, registered before the faults, so recovery does not wait for them."""
    before = {w["id"] for w in _workers(admin)}
    for name in names:
        dep.start_worker(name)
    wait_for(
        lambda: len([w for w in _workers(admin) if w["id"] not in before]) == len(names),
        120,
        0.5,
        f"{', '.join(names)} to register",
    )


def _resumed(http: httpx.Client, job_id: str, attempt: int) -> str | None:
    found = [m for m in _events(http, job_id) if m.endswith(f"(attempt {attempt})")]
    return found[0] if found and found[0].startswith("resumed from step") else None


def _node(dep: Deployment, rank: str) -> Any:
    """The worker process whose training process runs global rank ``rank``."""
    training = [p for p in dep.procs[1:] if p.poll() is None and descendants(p.pid)]
    return next(p for p in training if rank in _global_ranks(p.pid))


def test_killed_then_frozen_member_the_gang_resumes_each_time(
    fleet: tuple[Deployment, Any], reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Two faults in one job, each costing one attempt and at most one checkpoint interval:

    1. SIGKILL node 0's worker (it hosts the rendezvous): its ranks die with it, node 1's ranks
       end too (no orphan on either side), the reaper requeues the gang, and a new gang resumes
       from the last checkpoint.
    2. SIGSTOP node 1's worker and its ranks: its seat lapses, the reaper requeues the gang,
       node 0 is fenced (its ranks, stuck in a collective with the frozen ones, are ended), a
       third gang resumes. Thawed, the frozen worker's ranks end and it changes nothing.

    The adapter equals the uninterrupted 2-process reference.
    """
    dep, admin = fleet
    # Four workers: after each fault a gang of two re-forms at once.
    _spare_workers(dep, admin, "worker-c", "worker-d")
    with dep.client() as http:
        body = {**job_body(upload(http, ROWS), **BODY), "resources": {"nodes": 2}}
        job_id = http.post("/jobs", json=body).json()["id"]
        wait_for(lambda: _step(http, job_id) >= 10, 240, 0.1, "step 10")
        first = http.get(f"/jobs/{job_id}").json()["workers"]
        killed, survivor = _node(dep, "0"), _node(dep, "1")
        ranks = {"killed": descendants(killed.pid), "survivor": descendants(survivor.pid)}
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not alive(ranks["killed"]), 15, 0.2, "node 0's ranks to die with it")
        wait_for(lambda: not alive(ranks["survivor"]), 60, 0.2, "node 1's ranks to end")
        resumed = wait_for(lambda: _resumed(http, job_id, 2), 240, 0.3, "gang 2 to resume")
        after_kill = time.monotonic() - killed_at
        assert first[0] not in http.get(f"/jobs/{job_id}").json()["workers"]

        step = int(resumed.split()[3])
        wait_for(lambda: _step(http, job_id) > step, 240, 0.1, f"a step past {step}")
        frozen = tree(_node(dep, "1").pid)
        signal_tree(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        resumed_again = wait_for(lambda: _resumed(http, job_id, 3), 240, 0.3, "gang 3 to resume")
        after_freeze = time.monotonic() - frozen_at
        signal_tree(frozen, signal.SIGCONT)
        wait_for(lambda: not alive(frozen[1:]), 60, 0.2, "the thawed ranks to end")

        final = wait_final(http, job_id, timeout=400)
        assert final["status"] == "succeeded", (final, _timeline(http, job_id))
        assert final["attempts"] == 3 and len(final["workers"]) == 2
        steps = [int(resumed.split()[3]), int(resumed_again.split()[3])]
        assert all(n % BODY["checkpoint_every_steps"] == 0 for n in steps), steps
        requeued = [
            m
            for m in _events(http, job_id)
            if "gang member lost" in m or "retrying from the last checkpoint" in m
        ]
        assert len(requeued) == 2, requeued
        time.sleep(8)  # longer than a lease: nothing of the thawed worker may change the outcome
        again = http.get(f"/jobs/{job_id}").json()
        assert again["finished_at"] == final["finished_at"] and again["status"] == "succeeded"
        metrics = http.get(f"/jobs/{job_id}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == list(range(1, BODY["max_steps"] + 1))
        manifest, weights = _adapter(http, job_id, tmp_path / "served")
        assert manifest["world_size"] == 2
        diff = _max_diff(reference, weights)
        timeline = _timeline(http, job_id)
    for proc in dep.procs[1:]:
        if proc.poll() is None:
            wait_for(lambda p=proc: not descendants(p.pid), 30, 0.3, "no training process left")
    print(
        f"\nnode 0 SIGKILLed -> {resumed} after {after_kill:.1f}s; node 1 SIGSTOPped -> "
        f"{resumed_again} after {after_freeze:.1f}s; max |adapter diff| {diff:.2e}\n{timeline}"
    )
    assert diff < TOLERANCE
