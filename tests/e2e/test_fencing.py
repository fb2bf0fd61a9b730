"""Split brain over real processes: a worker frozen past its lease and thawed after the job moved
on must touch nothing of the live attempt (its folder, its rows, its checkpoints).

Both workers share ONE data dir (as `lorafleet up` plus a second `lorafleet worker` do), lease 6 s,
PostgreSQL (a schema of the shared server) and a private Redis broker.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.e2e.live import (
    Deployment,
    alive,
    chat_rows,
    deployment,
    job_body,
    signal_tree,
    tree,
    upload,
    wait_final,
    wait_for,
)
from tests.e2e.servers import TcpProxy, moto_s3, private_redis

ROWS = chat_rows(60)


def _step(http: httpx.Client, job_id: str) -> int:
    return int(http.get(f"/jobs/{job_id}/progress").json()["step"] or 0)


def _events(http: httpx.Client, job_id: str) -> list[str]:
    return [e["message"] for e in http.get(f"/jobs/{job_id}/events").json()["data"]]


def _resumed(http: httpx.Client, job_id: str, attempt: int) -> str | None:
    found = [m for m in _events(http, job_id) if m.endswith(f"(attempt {attempt})")]
    return found[0] if found and "resumed" in found[0] else None


def _checkpoint_rows(url: str, job_id: str) -> list[tuple[int, int, str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT step, epoch, storage_key FROM checkpoints WHERE job_id = :j"),
                {"j": job_id},
            )
            return sorted((int(s), int(e), str(k)) for s, e, k in rows)
    finally:
        engine.dispose()


def _start(dep: Deployment) -> httpx.Client:
    dep.key = dep.create_key("ops")
    dep.start_api()
    return dep.client()


def test_frozen_worker_thawed_late_harms_nothing(
    tiny_dir: Path, tmp_path: Path, pg_schema: str
) -> None:
    with (
        private_redis() as redis,
        deployment(
            tmp_path,
            {"tiny": tiny_dir},
            LORAFLEET_DATABASE_URL=pg_schema,
            LORAFLEET_BROKER_URL=redis.url,
        ) as dep,
        _start(dep) as http,
    ):
        # Long enough that A is still training when the test freezes it (a fast engine ran 40
        # steps before the first commit was visible on a loaded machine).
        body = job_body(upload(http, ROWS), max_steps=80, checkpoint_every_steps=5, batch_size=2)
        job_id = http.post("/jobs", json=body).json()["id"]
        worker_a = dep.start_worker("worker-a")
        wait_for(
            lambda: (
                _step(http, job_id) >= 12
                and any(s >= 10 for s, _, _ in _checkpoint_rows(pg_schema, job_id))
            ),
            240,
            0.1,
            "step 12 and checkpoint 10 committed on worker A",
        )
        frozen = tree(worker_a.pid)
        assert len(frozen) > 1, "worker A should have training processes"
        signal_tree(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        # What B must resume from: A's newest checkpoint committed before the freeze (one whose
        # upload was still in flight is not committed and must not be used).
        committed = max(s for s, e, _ in _checkpoint_rows(pg_schema, job_id) if e == 1)
        dep.start_worker("worker-b")  # same data dir, same host
        resumed = wait_for(lambda: _resumed(http, job_id, 2), 180, 0.3, "B to resume")
        resumed_after = time.monotonic() - frozen_at
        signal_tree(frozen, signal.SIGCONT)
        # A finds its lease gone: its ranks end, its writes are refused, its clean-up takes
        # only its own attempt folder.
        wait_for(lambda: not alive(frozen[1:]), 30, 0.2, "A's ranks to end after the thaw")
        final = wait_final(http, job_id, timeout=300)
        assert final["status"] == "succeeded", (final, dep.log("worker-b")[-3000:])
        assert final["attempts"] == 2
        time.sleep(8)  # longer than a lease: nothing of A's may change the outcome now
        again = http.get(f"/jobs/{job_id}").json()
        assert again["status"] == "succeeded" and again["finished_at"] == final["finished_at"]
        metrics = http.get(f"/jobs/{job_id}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == list(range(1, 81))
        manifest = final.get("manifest") or {}
        assert manifest.get("steps", 80) == 80
        step = int(resumed.split()[3])
        assert step == committed >= 10, (step, committed)
        assert all(epoch == 2 for _, epoch, _ in _checkpoint_rows(pg_schema, job_id))
        print(f"\nfreeze at step >=12 -> B resumed from step {step} after {resumed_after:.1f}s")


def test_upload_frozen_mid_way_is_never_used(
    tiny_dir: Path, tmp_path: Path, pg_schema: str
) -> None:
    """A's checkpoint upload hangs, A is frozen, B resumes from the last COMMITTED checkpoint;
    A thaws and its upload finishes late: it is refused (fenced) and its objects removed."""
    import boto3

    with moto_s3() as (storage_url, s3_port), private_redis() as redis:
        proxy_a, proxy_b = TcpProxy(s3_port), TcpProxy(s3_port)
        s3 = {
            "LORAFLEET_STORAGE_URL": storage_url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with (
            deployment(
                tmp_path,
                {"tiny": tiny_dir},
                LORAFLEET_DATABASE_URL=pg_schema,
                LORAFLEET_BROKER_URL=redis.url,
                LORAFLEET_S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
                **s3,
            ) as dep,
            _start(dep) as http,
        ):
            # Long enough that A is still training (its attempt folder there) once a commit of
            # its is visible: 30 steps could end before the first commit showed up under load.
            body = job_body(
                upload(http, ROWS), max_steps=120, checkpoint_every_steps=5, batch_size=2
            )
            job_id = http.post("/jobs", json=body).json()["id"]
            worker_a = dep.start_worker(
                "worker-a", {"LORAFLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy_a.port}"}
            )
            wait_for(
                lambda: any(e == 1 for _, e, _ in _checkpoint_rows(pg_schema, job_id)),
                240,
                0.2,
                "a checkpoint committed by A",
            )
            proxy_a.hold()  # A's next upload hangs half-way
            before = max(s for s, e, _ in _checkpoint_rows(pg_schema, job_id) if e == 1)
            progress = list((tmp_path / "data" / "work" / job_id).glob("*-1/progress.jsonl"))
            assert progress, "A's attempt folder carries its epoch"

            def saved_after_hold() -> int | None:
                steps = [
                    int(record["step"])
                    for line in progress[0].read_text().splitlines()
                    if line.strip()
                    for record in [json.loads(line)]
                    if record.get("type") == "checkpoint" and int(record["step"]) > before
                ]
                return max(steps) if steps else None

            held = wait_for(saved_after_hold, 120, 0.1, "A to save a checkpoint after the hold")
            time.sleep(1.0)  # the upload is in flight, held by the proxy
            frozen = tree(worker_a.pid)
            signal_tree(frozen, signal.SIGSTOP)
            committed = max(s for s, e, _ in _checkpoint_rows(pg_schema, job_id) if e == 1)
            assert committed < held, (committed, held)  # the held upload never committed
            dep.start_worker(
                "worker-b", {"LORAFLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy_b.port}"}
            )
            resumed = wait_for(lambda: _resumed(http, job_id, 2), 180, 0.3, "B to resume")
            assert resumed.startswith(f"resumed from step {committed} "), (resumed, held)
            proxy_a.release()
            signal_tree(frozen, signal.SIGCONT)  # A's upload now completes, late
            final = wait_final(http, job_id, timeout=300)
            assert final["status"] == "succeeded", final
            rows = _checkpoint_rows(pg_schema, job_id)
            # B committed its own; of A's only those committed before the freeze may remain
            # (kept until pruned), never the late one.
            assert any(epoch == 2 for _, epoch, _ in rows), rows
            assert all(
                f"-e{epoch}/" in key and (epoch == 2 or step <= committed)
                for step, epoch, key in rows
            ), rows
            client = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{s3_port}",
                region_name="us-east-1",
                aws_access_key_id="test",
                aws_secret_access_key="test",
            )

            def late_objects() -> list[str]:
                listed = client.list_objects_v2(
                    Bucket="lorafleet",
                    Prefix=f"artifacts/jobs/{job_id}/checkpoints/step_{held}-e1/",
                )
                return [o["Key"] for o in listed.get("Contents", [])]

            wait_for(lambda: not late_objects(), 60, 0.5, "A's late upload to be removed")
            proxy_a.down()
            proxy_b.down()
