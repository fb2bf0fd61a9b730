"""A live lorafleet for tests: a real uvicorn server and a real Celery worker, as subprocesses.

Plain functions and context managers, reusable by any test that must cross process boundaries
(the openai SDK, a browser, webhooks from the worker). Everything runs on the embedded defaults
inside one temporary data directory: SQLite, the filesystem broker, local storage, and a tiny
model built by the project. Each process is started in its own session and torn down by process
group, so the worker's training ranks die with it.

    with live_stack(tmp_path) as live:
        httpx.get(f"{live.url}/jobs", headers=live.headers)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
_VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PY) if _VENV_PY.exists() else sys.executable
T = TypeVar("T")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of every live process: this one's, minus any ``LORAFLEET_*`` leaking in
    from the caller's shell, plus one private data directory (and fast progress writes so tests
    see progress move)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(
        {
            "LORAFLEET_DATA_DIR": str(data_dir),
            "LORAFLEET_MODELS_DIR": str(data_dir / "models"),
            "LORAFLEET_PROGRESS_INTERVAL_SECONDS": "0.3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def wait_for(
    probe: Callable[[], T | None], timeout: float, interval: float = 0.25, what: str = "condition"
) -> T:
    """Call ``probe`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):  # ranks may outlive a dead leader
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop_group reaches its children
        )


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file (for assertion messages)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"({path} missing)"


@contextlib.contextmanager
def api_server(env: dict[str, str], log: Path, port: int | None = None) -> Iterator[str]:
    """``uvicorn --factory api.main:create_app`` on 127.0.0.1; yields its base URL once
    ``/healthz`` answers (the lifespan has migrated the database by then)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    args = [PYTHON, "-m", "uvicorn", "--factory", "api.main:create_app"]
    proc = _spawn([*args, "--host", "127.0.0.1", "--port", str(port)], env, log)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited with {proc.returncode}:\n{tail(log)}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=90, what="the API server")
        yield url
    finally:
        stop_group(proc)


@contextlib.contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``lorafleet worker`` (``python -m cli worker``): the Celery main process itself."""
    proc = _spawn([PYTHON, "-m", "cli", "worker"], env, log)
    try:
        yield proc
    finally:
        stop_group(proc, grace=20.0)


def create_key(env: dict[str, str], owner: str = "t", admin: bool = False) -> str:
    """``lorafleet keys create --owner OWNER``: the key is the last line of stdout."""
    args = [PYTHON, "-m", "cli", "keys", "create", "--owner", owner]
    if admin:
        args.append("--admin")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Live:
    """A running stack: base URL, key, paths and logs."""

    url: str
    key: str
    data_dir: Path
    env: dict[str, str]
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx.Client:
        """An httpx client on the native API, authenticated."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30)

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{tail(path)}" for name, path in self.logs.items())


def build_tiny_model(models_dir: Path, name: str = "tiny") -> Path:
    """The project's tiny Llama model under ``models_dir/name`` (imports torch: test side only)."""
    from worker.training.tiny import make_tiny

    target = models_dir / name
    if not (target / "config.json").exists():
        make_tiny(target)
    return target


@contextlib.contextmanager
def live_stack(base: Path, with_worker: bool = True, **env_overrides: str) -> Iterator[Live]:
    """Tiny model + API server + (optionally) one worker + an API key for owner ``t``."""
    data_dir = base / "data"
    build_tiny_model(data_dir / "models")
    env = live_env(data_dir, **env_overrides)
    logs = {"api": base / "logs" / "api.log"}
    with api_server(env, logs["api"]) as url:
        key = create_key(env, "t")
        live = Live(url=url, key=key, data_dir=data_dir, env=env, logs=logs)
        if not with_worker:
            yield live
            return
        logs["worker"] = base / "logs" / "worker.log"
        with worker_process(env, logs["worker"]):
            yield live


def chat_rows(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """A small chat dataset the tiny model trains on in a few steps."""
    from worker.training.tiny import sample_chat_rows

    return sample_chat_rows(n, seed=seed)
