"""Real processes for end-to-end tests: uvicorn API servers and `lorafleet worker`s.

Plain functions and a small dataclass (no fixtures framework magic), so tests read as the user
path: make a deployment, start its parts, call its HTTP API, kill what needs killing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
FINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(offset, offset + n)
    ]


@dataclass
class Deployment:
    """One lorafleet installation: settings (env), its processes and a logged-in client."""

    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0
    key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def create_key(self, owner: str = "tester", admin: bool = False) -> str:
        args = ["keys", "create", "--owner", owner] + (["--admin"] if admin else [])
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def _spawn(
        self, args: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (lives as long as the process)
        proc = subprocess.Popen(
            args,
            env={**self.env, **(env or {})},
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def start_api(self) -> subprocess.Popen[bytes]:
        self.port = self.port or free_port()
        proc = self._spawn(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port)], f"api-{self.port}"
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log(f"api-{self.port}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("API did not start: " + self.log(f"api-{self.port}"))

    def start_worker(
        self, name: str = "worker", env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A `lorafleet worker`; ``env`` overrides settings for this worker only."""
        return self._spawn([sys.executable, "-m", "cli", "worker"], name, env)

    def start_inference(
        self, name: str = "inference", env: dict[str, str] | None = None, wait: bool = True
    ) -> tuple[subprocess.Popen[bytes], str]:
        """A `lorafleet inference` on a free port; returns it and its URL once it answers
        (``wait=False``: at once, with no URL; the API finds it once it has registered)."""
        path = self.root / f"{name}.log"
        offset = path.stat().st_size if path.exists() else 0
        proc = self._spawn([sys.executable, "-m", "cli", "inference"], name, env)
        if not wait:
            return proc, ""
        deadline = time.monotonic() + 180
        url = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log(name)
            if url is None and path.exists():
                with open(path, "rb") as stream:
                    stream.seek(offset)
                    found = re.search(rb"lorafleet inference: (http://\S+)", stream.read())
                url = found.group(1).decode() if found else None
            if url is not None:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        raise AssertionError("inference server did not start: " + self.log(name))

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def client(self, key: str | None = None) -> httpx.Client:
        token = key or self.key
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=30,
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def _suppress() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def deployment(root: Path, models: dict[str, Path], **env: str) -> Iterator[Deployment]:
    """A deployment in ``root``: models linked into its models dir, settings from ``env``."""
    data = root / "data"
    (data / "models").mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        link = data / "models" / name
        if not link.exists():
            link.symlink_to(path, target_is_directory=True)
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")},
        "LORAFLEET_DATA_DIR": str(data),
        "LORAFLEET_LEASE_SECONDS": "6",
        "LORAFLEET_REQUEUE_GRACE_SECONDS": "3",
        "LORAFLEET_PROGRESS_INTERVAL_SECONDS": "0.3",
        "PYTHONPATH": str(REPO),
        **env,
    }
    dep = Deployment(root=root, env=full_env)
    try:
        yield dep
    finally:
        dep.stop()


def upload(http: httpx.Client, rows: list[dict[str, Any]], name: str = "train.jsonl") -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = http.post("/files", files={"file": (name, body, "application/jsonl")})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_body(training_file: str, model: str = "tiny", **training: Any) -> dict[str, Any]:
    return {
        "base_model": model,
        "training_file": training_file,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": 6,
            "batch_size": 2,
            "learning_rate": 0.005,
            "max_seq_length": 128,
            "warmup_ratio": 0.0,
            **training,
        },
    }


def wait_for(
    predicate: Callable[[], Any], timeout: float = 180, interval: float = 0.3, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def wait_final(http: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in FINAL else None

    return dict(wait_for(final, timeout, 0.5, f"job {job_id} to finish"))


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree(pid: int) -> list[int]:
    """``pid`` and every process under it (what SIGSTOP must freeze to freeze a worker)."""
    return [pid, *descendants(pid)]


def signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            pass
    return living
