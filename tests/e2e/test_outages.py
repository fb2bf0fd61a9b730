"""A short outage of the database, the broker or object storage costs nothing: the job keeps
training on its first attempt and succeeds. Each server here is private to the test (restarting
the shared ones would break other tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.live import chat_rows, deployment, job_body, upload, wait_for
from tests.e2e.servers import TcpProxy, moto_s3, postgres_available, private_postgres, private_redis

ROWS = chat_rows(200)
LEASE = "10"  # the outages below last a few seconds: well inside one lease
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _get(http: httpx.Client, path: str) -> dict[str, Any] | None:
    """GET that tolerates the API answering 5xx or not at all during an outage."""
    try:
        response = http.get(path)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _step(http: httpx.Client, job_id: str) -> int:
    progress = _get(http, f"/jobs/{job_id}/progress")
    return int((progress or {}).get("step") or 0)


def _fault_and_recover(
    http: httpx.Client, job_id: str, at_step: int, fault: Callable[[], float], what: str
) -> int:
    """Inject ``fault`` once training passed ``at_step``; training must go on right after.
    Returns the step at which the fault was injected (the next fault goes after it)."""
    wait_for(lambda: _step(http, job_id) >= at_step, 240, 0.1, f"step {at_step}")
    before = _step(http, job_id)
    down = fault()
    back = time.monotonic()
    # Training goes on during the outage (its writes wait in the outbox): what must show is a
    # newer step written after the server came back.
    after = wait_for(
        lambda: _step(http, job_id) > before and _step(http, job_id),
        120,
        0.2,
        f"progress after the {what}",
    )
    print(
        f"\n{what}: down {down:.1f}s at step {before}; progress visible again "
        f"{time.monotonic() - back:.1f}s after it came back"
    )
    return int(after)


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL 15 binaries for initdb")
def test_database_broker_and_storage_outages_cost_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    """One job, three outages in a row (PostgreSQL restarted, Redis restarted, S3 unreachable
    for 6 s): it keeps training on its first attempt and succeeds with every step recorded."""
    # Long enough that all three faults land mid-run (they take ~25 s in all): with one thread
    # per process the tiny model ran 400 steps of 2 x 128 tokens in 10 s, and training goes on
    # during each outage (here 600 steps of 8 x 128 took 25 s, the last fault at step 270).
    steps = 1000
    with moto_s3() as (storage_url, s3_port), private_postgres() as pg, private_redis() as redis:
        proxy = TcpProxy(s3_port)

        def storage_outage() -> float:
            started = time.monotonic()
            proxy.down()  # refused: every upload and download fails until it is back
            time.sleep(6.0)
            proxy.up()
            return time.monotonic() - started

        with deployment(
            tmp_path,
            {"tiny": tiny_dir},
            LORAFLEET_DATABASE_URL=pg.url,
            LORAFLEET_BROKER_URL=redis.url,
            LORAFLEET_LEASE_SECONDS=LEASE,
            LORAFLEET_STORAGE_URL=storage_url,
            LORAFLEET_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
            **S3_ENV,
        ) as dep:
            dep.key = dep.create_key("ops")
            dep.start_api()
            with dep.client() as http:
                body = job_body(
                    upload(http, ROWS), max_steps=steps, checkpoint_every_steps=25, batch_size=8
                )
                job_id = http.post("/jobs", json=body).json()["id"]
                dep.start_worker()
                at = _fault_and_recover(
                    http, job_id, 8, lambda: pg.restart(2.0), "PostgreSQL restart"
                )
                at = _fault_and_recover(
                    http, job_id, at + 5, lambda: redis.restart(2.0), "Redis restart"
                )
                _fault_and_recover(http, job_id, at + 5, storage_outage, "storage outage")

                def final() -> dict[str, Any] | None:
                    job = _get(http, f"/jobs/{job_id}")
                    return job if job and job["status"] in ("succeeded", "failed") else None

                job = wait_for(final, 300, 0.5, "the job to finish")
                events = [e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["data"]]
                metrics = http.get(f"/jobs/{job_id}/metrics").json()["data"]
            assert job["status"] == "succeeded", (job, dep.log("worker")[-4000:])
            assert job["attempts"] == 1, events
            assert not any(m.startswith("resumed from") for m in events), events
            assert [m["step"] for m in metrics] == list(range(1, steps + 1))
            assert any("unreachable" in m and "training went on" in m for m in events), events
        proxy.down()
