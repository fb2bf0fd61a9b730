"""A fleet of two real workers: jobs spread over them, the third waits, ops see it all.

Real processes on the embedded defaults: one uvicorn API, two ``lorafleet worker`` Celery
processes (one CPU training process each), the filesystem broker and SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.live import chat_rows, deployment, job_body, upload, wait_final, wait_for


def test_two_workers_three_jobs(tmp_path: Path, tiny_dir: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}, LORAFLEET_WORKER_PROCS="1") as dep:
        dep.start_api()
        dep.key = dep.create_key("alice")
        admin = dep.client(dep.create_key("ops", admin=True))
        dep.start_worker("worker-1")
        dep.start_worker("worker-2")

        def workers() -> list[dict[str, Any]]:
            return list(admin.get("/workers").json()["data"])

        wait_for(lambda: len(workers()) == 2, 120, 0.5, "two workers to register")
        with dep.client() as http:
            assert http.get("/workers").status_code == 403  # not an admin key
            file_id = upload(http, chat_rows(60))

            # Routing: nothing in a CPU-only fleet has an H100.
            refused = http.post(
                "/jobs", json={**job_body(file_id), "resources": {"gpu_type": "H100"}}
            )
            assert refused.status_code == 422, refused.text
            assert "resources.gpu_type" in refused.text and "H100" in refused.text

            ids = [
                http.post("/jobs", json=job_body(file_id, max_steps=80)).json()["id"]
                for _ in range(3)
            ]

            def two_running() -> list[dict[str, Any]] | None:
                jobs = [http.get(f"/jobs/{i}").json() for i in ids]
                states = sorted(j["status"] for j in jobs)
                return jobs if states == ["queued", "running", "running"] else None

            jobs = wait_for(two_running, 180, 0.3, "two jobs running, one queued")
            running = {j["id"] for j in jobs if j["status"] == "running"}
            busy = wait_for(
                lambda: (
                    [w for w in workers() if w["status"] == "busy"]
                    if sum(w["status"] == "busy" for w in workers()) == 2
                    else None
                ),
                30,
                0.3,
                "both workers busy",
            )
            assert {w["current_job"] for w in busy} == running
            assert {w["procs"] for w in busy} == {1}

            finals = [wait_final(http, i, 400) for i in ids]
            assert [j["status"] for j in finals] == ["succeeded"] * 3, finals
            assert len({j["id"] for j in finals}) == 3
            wait_for(lambda: all(w["status"] == "idle" for w in workers()), 30, 0.5, "workers idle")
            metrics = admin.get("/metrics").text
            assert 'lorafleet_jobs{state="succeeded"} 3.0' in metrics
            assert 'lorafleet_workers{status="idle"} 2.0' in metrics
        admin.close()
