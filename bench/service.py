"""Service benchmark: what the service adds on top of the engine, and how the API holds up.

    python -m bench.service                  # ~1 minute job on the tiny 5m model
    python -m bench.service --steps 10 --load-seconds 5    # quick look

In one invocation, on a temporary ``LORAFLEET_DATA_DIR`` with auth disabled (everything on
127.0.0.1, every process started here is stopped here):

1. the job through ``lorafleet train`` (process start to exit);
2. the same job body through the service: ``uvicorn`` API + one ``lorafleet worker`` (Celery),
   ``POST /files`` then ``POST /jobs``, polled until ``succeeded`` (submit to succeeded);
   ratio service / CLI (target <= 1.05), fastest of ``--repeats`` interleaved pairs;
3. on that job, with the worker idle at submit: submit -> first step, split from the job's events
   into queue wait, engine start + model load, and the first step; "excluding model load" is the
   total minus the engine's start + load;
4. ``GET /jobs/{id}`` from 50 concurrent httpx async clients for 20 s: p50/p99 and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import common


def _job_body(training_file: str, steps: int, seq: int, batch: int) -> dict[str, Any]:
    return {
        "base_model": "tiny-5m",
        "training_file": training_file,
        "lora": common.LORA,
        "training": {
            "max_steps": steps,
            "batch_size": batch,
            "learning_rate": 2e-4,
            "max_seq_length": seq,
            "seed": 0,
        },
    }


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args,
            env=env,
            cwd=common.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_cli(env: dict[str, str], work: Path, body: dict[str, Any], timeout: float) -> float:
    spec = work / "cli-spec.json"
    spec.write_text(json.dumps(body))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "train", str(spec), "--out", str(work / "cli-adapter")],
        env=env,
        cwd=common.REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"lorafleet train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def _wait_ready(http: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API exited with {proc.returncode}")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("API not ready in time")


def _wait_worker(proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    """Until Celery says the worker is ready: "idle worker" means waiting for work, not booting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: see {log}")
        if log.exists() and " ready." in log.read_text(errors="replace"):
            time.sleep(1.0)  # past its first broker poll
            return
        time.sleep(0.2)
    raise RuntimeError("worker not ready in time")


def run_service_job(
    http: httpx.Client, file_id: str, body: dict[str, Any], timeout: float
) -> dict[str, Any]:
    submitted = time.time()
    created = http.post("/jobs", json={**body, "training_file": file_id})
    created.raise_for_status()
    job_id = created.json()["id"]
    first_step: float | None = None
    deadline = time.monotonic() + timeout
    status = "queued"
    while time.monotonic() < deadline:
        progress = http.get(f"/jobs/{job_id}/progress").json()
        status = progress["status"]
        if first_step is None and (progress.get("step") or 0) >= 1:
            first_step = time.time()
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    done = time.time()
    if status != "succeeded":
        job = http.get(f"/jobs/{job_id}").json()
        raise RuntimeError(f"job ended {status}: {job.get('error')}")
    events = http.get(f"/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    started = next(
        (_ts(e["created_at"]) for e in events if e["message"].startswith("started")), None
    )
    loaded = next(
        (_ts(e["created_at"]) for e in events if e["message"].startswith("training ")), None
    )
    out: dict[str, Any] = {"job_id": job_id, "seconds": done - submitted}
    if first_step is not None:
        out["submit_to_first_step_s"] = first_step - submitted
        if started is not None and loaded is not None:
            out["queue_wait_s"] = started - submitted
            out["engine_start_and_load_s"] = loaded - started
            out["first_step_after_load_s"] = first_step - loaded
            out["submit_to_first_step_excl_load_s"] = (first_step - submitted) - (loaded - started)
    return out


async def _hammer(url: str, path: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        stop = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    response = await http.get(path)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        wall = time.perf_counter() - began
    latencies.sort()
    pick = (
        (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))])
        if latencies
        else (lambda q: float("nan"))
    )
    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * pick(0.50),
        "p99_ms": 1000 * pick(0.99),
        "max_ms": 1000 * latencies[-1] if latencies else float("nan"),
    }


def _runs(values: list[float]) -> str:
    return "runs: " + ", ".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="job steps (about a minute here)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved CLI/service pairs")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per job")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = parser.parse_args(argv)

    info = {**common.machine(), **common.versions()}
    print(f"[bench] {json.dumps(info)}", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-service-"))
    data_dir = work / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "tiny-5m").symlink_to(common.model_dir("5m"), target_is_directory=True)
    dataset = common.write_jsonl(work / "train.jsonl", common.bench_rows(args.rows))
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(data_dir),
        "LORAFLEET_AUTH_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for key in (
        "LORAFLEET_DATABASE_URL",
        "LORAFLEET_BROKER_URL",
        "LORAFLEET_STORAGE_URL",
        "LORAFLEET_MODELS_DIR",
    ):
        env.pop(key, None)
    results: dict[str, Any] = {"machine": info, "args": vars(args)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"[bench] lorafleet train, {args.steps} steps ...", file=sys.stderr, flush=True)
        body = _job_body(str(dataset), args.steps, args.seq, args.batch)
        cli_runs = [run_cli(env, work, body, args.timeout)]

        from worker.training.launch import free_port

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api = _start(
            [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env,
            work / "api.log",
        )
        procs.append(api)
        with httpx.Client(base_url=url, timeout=60) as http:
            _wait_ready(http, api)
            worker = _start([sys.executable, "-m", "cli", "worker"], env, work / "worker.log")
            procs.append(worker)
            with open(dataset, "rb") as stream:
                upload = http.post("/files", files={"file": ("train.jsonl", stream)})
            upload.raise_for_status()
            _wait_worker(worker, work / "worker.log")
            print("[bench] same job through the service ...", file=sys.stderr, flush=True)
            job = run_service_job(http, upload.json()["id"], body, args.timeout)
            service_runs = [job["seconds"]]
            # Interleave further pairs: on a shared machine the load drifts between runs, and
            # the fastest of each side is the least disturbed estimate of its cost.
            for _ in range(args.repeats - 1):
                cli_runs.append(run_cli(env, work, body, args.timeout))
                again = run_service_job(http, upload.json()["id"], body, args.timeout)
                service_runs.append(again["seconds"])
            results["service"] = job
            results["cli_seconds"] = cli_runs
            results["service_seconds"] = service_runs
            results["service_over_cli"] = min(service_runs) / min(cli_runs)
            print(
                f"[bench] GET /jobs/{{id}}: {args.clients} clients x {args.load_seconds:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            results["api_load"] = asyncio.run(
                _hammer(url, f"/jobs/{job['job_id']}", args.clients, args.load_seconds)
            )
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    s, load = results["service"], results["api_load"]
    rows = [
        ["lorafleet train (s)", f"{min(cli_runs):.1f}", _runs(cli_runs)],
        ["service submit -> succeeded (s)", f"{min(service_runs):.1f}", _runs(service_runs)],
        ["service / CLI (fastest of each)", f"{results['service_over_cli']:.3f}", "target <= 1.05"],
    ]
    if "submit_to_first_step_excl_load_s" in s:
        rows += [
            ["submit -> first step (s)", f"{s['submit_to_first_step_s']:.2f}", "idle worker"],
            ["  queue wait: submit -> engine launched", f"{s['queue_wait_s']:.2f}", ""],
            ["  engine start + model load", f"{s['engine_start_and_load_s']:.2f}", ""],
            ["  first step after load", f"{s['first_step_after_load_s']:.2f}", ""],
            [
                "submit -> first step excl. model load (s)",
                f"{s['submit_to_first_step_excl_load_s']:.2f}",
                "",
            ],
        ]
    rows += [
        [
            f"GET /jobs/{{id}} req/s ({load['clients']} clients)",
            f"{load['requests_per_s']:.0f}",
            f"{load['requests']} ok, {load['errors']} errors in {load['seconds']:.1f} s",
        ],
        ["  p50 latency (ms)", f"{load['p50_ms']:.1f}", ""],
        ["  p99 latency (ms)", f"{load['p99_ms']:.1f}", f"max {load['max_ms']:.0f}"],
    ]
    print(f"\n== service: tiny 5m, {args.steps} steps of {args.batch} x {args.seq} ==")
    print(common.table(["measure", "value", "note"], rows))
    print(f"load avg at start {info['load_avg_1m_at_start']}; {info['cores']} cores")
    print(f"results: {common.save_results('service', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
