"""`lorafleet up`: the API, a worker and an inference server from one command, stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.e2e.live import deployment, free_port, wait_for


def test_up_starts_api_worker_and_inference_server_and_stops_them(tmp_path: Path) -> None:
    with deployment(tmp_path, {}) as dep:
        admin = dep.create_key("ops", admin=True)
        dep.port = free_port()
        log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 (lives as long as the process)
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(dep.port)],
            env=dep.env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        dep.procs.append(up)
        try:
            with dep.client(admin) as http:

                def registered() -> dict[str, list[dict[str, str]]] | None:
                    try:
                        fleet = http.get("/workers").json()
                    except httpx.HTTPError:
                        return None
                    if fleet.get("data") and fleet.get("inference_servers"):
                        return dict(fleet)
                    return None

                fleet = wait_for(registered, timeout=240, what="worker and inference server")
            server = fleet["inference_servers"][0]
            assert server["status"] != "offline" and server["device"].startswith("cpu")
            assert httpx.get(server["url"] + "/healthz", timeout=10).status_code == 200
            children = psutil.Process(up.pid).children(recursive=True)
            assert len(children) >= 3
        finally:
            if up.poll() is None:
                os.kill(up.pid, signal.SIGTERM)  # `up` alone: it stops what it started
        assert up.wait(timeout=90) == 0, (tmp_path / "up.log").read_text()[-3000:]
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
