"""``lorafleet``: run the service (serve, worker, up), the engine alone (train), and the client.

Every verb reads the same ``LORAFLEET_*`` settings. Heavy imports (torch, uvicorn, celery) happen
inside the verbs so ``lorafleet --help`` and the client verbs start fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import client as client_cmds
from shared.config import get_settings

app = typer.Typer(help="lorafleet: self-hosted LoRA fine-tuning.", no_args_is_help=True)
models_app = typer.Typer(help="Base models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
client_cmds.register(app)
err = Console(stderr=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the HTTP API (upgrades the database schema to head first)."""
    import uvicorn

    from shared.db import upgrade_to_head

    settings = get_settings()
    if settings.auth_disabled and not _is_loopback(host):
        err.print(
            f"[red]refusing to serve without auth on non-loopback address {host}[/red]: unset "
            "LORAFLEET_AUTH_DISABLED or bind 127.0.0.1"
        )
        raise typer.Exit(2)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    uvicorn.run(
        "api.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info"
    )


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "",
    name: Annotated[
        str | None, typer.Option(help="Node name (default unique per process).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run a Celery worker that trains jobs; this process *becomes* the Celery main process."""
    from shared.db import upgrade_to_head
    from shared.queueing import DEFAULT_QUEUE

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    node = name or f"lorafleet-{uuid.uuid4().hex[:8]}@%h"
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "-n",
        node,
        "-Q",
        queues or DEFAULT_QUEUE,
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if (settings.broker_url or "").startswith(("redis://", "rediss://", "amqp://")):
        args.append("-E")
    sys.stdout.flush()
    os.execv(sys.executable, args)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """API + one worker together on this machine (laptop mode). Ctrl-C stops both."""
    from shared.db import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    exe = [sys.executable, "-m", "cli"]
    api = subprocess.Popen([*exe, "serve", "--host", host, "--port", str(port)])
    worker_proc = subprocess.Popen([*exe, "worker"])
    err.print(f"lorafleet up: API on http://{host}:{port}, worker pid {worker_proc.pid}")
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in (api, worker_proc):
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping and api.poll() is None:
            if worker_proc.poll() is not None and not stopping:
                # A worker that died (OOM, kill -9) is replaced; its job resumes from the
                # database lease and its last checkpoint.
                err.print(f"worker exited ({worker_proc.returncode}); starting a new one")
                time.sleep(1.0)
                worker_proc = subprocess.Popen([*exe, "worker"])
            time.sleep(0.5)
        code = api.returncode or 0
    finally:
        stop()
        deadline = time.monotonic() + 60
        for proc in (api, worker_proc):
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    raise typer.Exit(code)


def _resolve_model(name: str) -> str:
    folder = get_settings().models_path / name
    if folder.is_dir():
        return str(folder.resolve())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name  # a hub id: from_pretrained fetches (or finds it in the HF cache)


@app.command()
def train(
    spec_file: Annotated[Path, typer.Argument(help="Job body JSON; files are local paths.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter output folder.")],
    nproc: Annotated[int | None, typer.Option(help="DDP processes (default: GPUs, or 1).")] = None,
    resume_from: Annotated[Path | None, typer.Option(help="A step_N checkpoint folder.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default OUT/checkpoints.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print progress as JSON lines.")
    ] = False,
) -> None:
    """Train an adapter with the engine alone: no server, no database."""
    from pydantic import ValidationError

    from shared.datasets import DatasetError, load_examples
    from shared.spec import JobSpec
    from worker.training.launch import device_count, iter_progress, launch

    try:
        spec = JobSpec.model_validate_json(spec_file.read_text())
    except (OSError, ValidationError) as exc:
        err.print(f"[red]invalid spec {spec_file}[/red]: {exc}")
        raise typer.Exit(2) from None
    base = spec_file.parent
    files = {}
    for field in ("training_file", "validation_file"):
        value = getattr(spec, field)
        if value:
            path = (
                (base / value)
                if not Path(value).is_absolute() and not Path(value).exists()
                else Path(value)
            )
            try:
                load_examples(str(path))
            except (OSError, DatasetError) as exc:
                err.print(f"[red]{field} {path}[/red]: {exc}")
                raise typer.Exit(2) from None
            files[field] = str(path.resolve())
    spec = spec.model_copy(update=files)
    model_path = _resolve_model(spec.base_model)
    nproc = nproc or device_count() or 1
    out = out.resolve()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-train-"))
    spec_path = work / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    progress = work / "progress.jsonl"
    group = launch(
        spec_path,
        out,
        nproc,
        work_dir=work,
        model_path=model_path,
        progress_file=progress,
        checkpoint_dir=checkpoint_dir.resolve() if checkpoint_dir else None,
        resume_from=resume_from.resolve() if resume_from else None,
    )
    code: int | None = None

    def stopped() -> bool:
        nonlocal code
        code = group.poll()
        return code is not None

    error = None
    try:
        for record in iter_progress(progress, stopped):
            if json_output:
                print(json.dumps(record), flush=True)
            else:
                _print_record(record)
            if record.get("type") == "error":
                error = record.get("message")
    except KeyboardInterrupt:
        group.terminate()
        raise typer.Exit(130) from None
    if code != 0:
        err.print(f"[red]training failed (exit {code})[/red]: {error or ''}")
        if not error:
            err.print(group.log_tail(3000))
        raise typer.Exit(code if code and code > 0 else 1)
    err.print(f"adapter written to {out}")


def _print_record(record: dict[str, Any]) -> None:
    kind = record.get("type")
    if kind == "progress":
        loss = record.get("train_loss")
        eval_loss = record.get("eval_loss")
        tps = record.get("tokens_per_second") or 0
        line = (
            f"step {record['step']}/{record['total_steps']}  loss {loss:.4f}"
            + (f"  eval {eval_loss:.4f}" if eval_loss is not None else "")
            + f"  lr {record.get('learning_rate', 0):.2e}  {tps:,.0f} tok/s"
            + f"  eta {record.get('eta_seconds') or 0:.0f}s"
        )
        err.print(line, highlight=False)
    elif kind == "event":
        err.print(f"[{record.get('level', 'info')}] {record.get('message')}", highlight=False)
    elif kind == "checkpoint":
        err.print(f"checkpoint step {record['step']}: {record['path']}", highlight=False)
    elif kind == "error":
        err.print(f"[red]error[/red] {record.get('message')}", highlight=False)


@models_app.command("make-tiny")
def make_tiny_cmd(
    directory: Annotated[Path, typer.Argument(help="Output folder.")],
    size: Annotated[str, typer.Option(help="default, 5m or 40m.")] = "default",
    arch: Annotated[str, typer.Option(help="llama or gpt2.")] = "llama",
    chat_template: Annotated[bool, typer.Option(help="Give the tokenizer a chat template.")] = True,
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
) -> None:
    """Write a small random-init model + offline tokenizer loadable with from_pretrained(DIR)."""
    from worker.tiny_models import TINY_SIZES, make_tiny, make_tiny_gpt2

    kwargs: dict[str, Any] = dict(TINY_SIZES[size]) if size != "default" else {}
    if arch == "gpt2":
        make_tiny_gpt2(directory, seed=seed)
    else:
        make_tiny(directory, seed=seed, chat_template=chat_template, **kwargs)
    print(directory.resolve())


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Tenant name.")],
    admin: Annotated[bool, typer.Option(help="May see fleet routes.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Create an API key; it is printed once (only its hash is stored)."""
    from shared.db import session_scope, upgrade_to_head
    from shared.services.keys import create_key

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    with session_scope() as session:
        plaintext, _ = create_key(session, owner, admin)
    if json_output:
        print(json.dumps({"key": plaintext, "owner": owner, "admin": admin}))
    else:
        err.print(f"API key for {owner}{' (admin)' if admin else ''}; store it now:")
        print(plaintext)


@app.command()
def demo() -> None:
    """The whole user path on the embedded defaults (what `make demo` runs)."""
    from cli.demo import main as run_demo

    raise typer.Exit(run_demo())


if __name__ == "__main__":
    app()
