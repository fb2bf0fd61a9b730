"""``lorafleet``: run the service (serve, worker, up), the engine alone (train), and the client.

Every verb reads the same ``LORAFLEET_*`` settings. Heavy imports (torch, uvicorn, celery) happen
inside the verbs so ``lorafleet --help`` and the client verbs start fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import chat as chat_cmds
from cli import client as client_cmds
from cli import resources
from cli.client import example
from cli.http import EXIT_CODES_HELP, EXIT_INTERRUPTED, CliError
from shared.config import get_settings


class Lorafleet(typer.Typer):
    """The ``lorafleet`` command: every failure is one line and an exit code, never a traceback.

    ``LORAFLEET_DEBUG=1`` lets unexpected errors show their traceback (for bug reports).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except CliError as exc:
            err.print(f"[red]error:[/red] {exc.message}", highlight=False)
            sys.exit(exc.code)
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if os.environ.get("LORAFLEET_DEBUG"):
                raise
            err.print(
                f"[red]error:[/red] {type(exc).__name__}: {exc} "
                "(unexpected; LORAFLEET_DEBUG=1 shows the traceback)",
                highlight=False,
            )
            sys.exit(1)


err = Console(stderr=True, soft_wrap=True)  # one error, one line, whatever the width
app = Lorafleet(
    help="lorafleet: self-hosted LoRA fine-tuning.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
client_cmds.register(app)
chat_cmds.register(app)
resources.register(app, models_app, keys_app)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command(epilog=example("lorafleet serve --host 0.0.0.0 --port 8000"))
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


@app.command(epilog=example("LORAFLEET_BROKER_URL=redis://host:6379/0 lorafleet worker"))
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "",
    name: Annotated[
        str | None, typer.Option(help="Node name (default unique per process).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run a Celery worker that trains jobs; this process *becomes* the Celery main process."""
    from shared.db import upgrade_to_head
    from shared.queueing import DEFAULT_QUEUE, broker_kind

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
    if broker_kind(settings.broker_url).has_server:
        args.append("-E")
    sys.stdout.flush()
    os.execv(sys.executable, args)


@app.command(epilog=example("lorafleet inference --host 0.0.0.0 --port 8100"))
def inference(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    advertise_url: Annotated[
        str | None,
        typer.Option(help="URL the API reaches this server at (default http://HOST:PORT)."),
    ] = None,
) -> None:
    """Run an inference server: OpenAI-compatible completions of base models and adapters.

    It registers itself in the database, so the API finds it with no further setting.
    """
    from worker.inference.main import serve as serve_inference

    serve_inference(host, port, advertise_url)


@app.command(epilog=example("lorafleet up --port 8000", "lorafleet up --no-inference"))
def up(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    with_inference: Annotated[
        bool,
        typer.Option(
            "--inference/--no-inference",
            help="Also start an inference server (`lorafleet inference`, on a free port).",
        ),
    ] = True,
) -> None:
    """API + one worker + an inference server on this machine (laptop mode). Ctrl-C stops all."""
    from shared.db import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    exe = [sys.executable, "-m", "cli"]
    api = subprocess.Popen([*exe, "serve", "--host", host, "--port", str(port)])
    # Helpers that are replaced when they die: a job resumes from the database lease and its
    # last checkpoint; an inference server registers again under a new URL.
    helpers = {"worker": [*exe, "worker"]}
    if with_inference:
        helpers["inference server"] = [*exe, "inference"]
    procs = {name: subprocess.Popen(args) for name, args in helpers.items()}
    err.print(
        f"lorafleet up: API on http://{host}:{port}, "
        + ", ".join(f"{name} pid {proc.pid}" for name, proc in procs.items())
    )
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in (api, *procs.values()):
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping and api.poll() is None:
            for name, proc in list(procs.items()):
                if proc.poll() is not None and not stopping:
                    err.print(f"{name} exited ({proc.returncode}); starting a new one")
                    time.sleep(1.0)
                    procs[name] = subprocess.Popen(helpers[name])
            time.sleep(0.5)
        code = api.returncode or 0
    finally:
        stop()
        deadline = time.monotonic() + 60
        for proc in (api, *procs.values()):
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    raise typer.Exit(code)


@app.command(epilog=example("lorafleet train job.json --out adapter --nproc 2"))
def train(
    spec_file: Annotated[Path, typer.Argument(help="Job body JSON; files are local paths.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter output folder.")],
    nproc: Annotated[
        int | None,
        typer.Option(help="Processes, DDP or FSDP by training.strategy (default: GPUs, or 1)."),
    ] = None,
    resume_from: Annotated[Path | None, typer.Option(help="A step_N checkpoint folder.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default OUT/checkpoints.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print progress as JSON lines.")
    ] = False,
) -> None:
    """Train an adapter with the engine alone: no server, no database."""
    from pydantic import ValidationError

    from shared.datasets import DatasetError, load_examples
    from shared.services.fleet import locate_base_model
    from shared.spec import JobSpec
    from worker.training import events
    from worker.training.launch import device_count
    from worker.training.run import Outcome, StopRequest, TrainingRun

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
    init = spec.training.init_adapter
    if init:  # here a local adapter folder (the service takes job ids and checkpoint names)
        folder = base / init if not Path(init).is_absolute() and not Path(init).exists() else None
        folder = (folder or Path(init)).expanduser()
        if not (folder / "adapter_config.json").is_file():
            err.print(f"[red]training.init_adapter {folder}[/red]: no peft adapter folder there")
            raise typer.Exit(2)
        training = spec.training.model_copy(update={"init_adapter": str(folder.resolve())})
        spec = spec.model_copy(update={"training": training})
    # The engine alone on the user's own machine may also read a local folder by path; any other
    # name goes through the service's one resolver (models dir, mirrors, allowed hub ids).
    local = Path(spec.base_model).expanduser()
    if local.is_dir():
        model_path = str(local.resolve())
    else:
        try:
            where = locate_base_model(spec.base_model, get_settings())
        except ValueError as exc:
            err.print(f"[red]base_model[/red]: {exc}")
            raise typer.Exit(2) from None
        model_path = str(where.resolve()) if isinstance(where, Path) else where
    nproc = nproc or device_count() or 1
    out = out.resolve()
    run = TrainingRun(
        spec=spec,
        model_path=model_path,
        work_dir=Path(tempfile.mkdtemp(prefix="lorafleet-train-")),
        out_dir=out,
        nproc=nproc,
        resume_from=resume_from.resolve() if resume_from else None,
        checkpoint_dir=checkpoint_dir.resolve() if checkpoint_dir else None,
    )
    interrupted = False

    def on_interrupt(*_: Any) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_interrupt)
    result = run.run(
        on_record=(lambda r: print(events.dumps(r), flush=True)) if json_output else _print_record,
        control=lambda: StopRequest.CANCEL if interrupted else None,
    )
    if result.outcome == Outcome.CANCELLED:
        err.print("interrupted; training stopped")
        raise typer.Exit(130)
    if result.outcome != Outcome.SUCCEEDED:
        code = result.exit_code
        reason = result.error.message if result.error else f"rank exit status {code}"
        err.print(f"[red]training failed[/red]: {reason} (rank logs in {run.work_dir})")
        if result.error is None and run.group is not None:
            err.print(run.group.log_tail(3000), markup=False, highlight=False)
        raise typer.Exit(code if code and code > 0 else 1)
    shutil.rmtree(run.work_dir, ignore_errors=True)  # kept only when the run failed
    err.print(f"adapter written to {out}")


def _print_record(record: Any) -> None:
    """One line on stderr per engine record (``worker.training.events``)."""
    from worker.training import events

    if isinstance(record, events.Step):
        loss = f"{record.train_loss:.4f}" if record.train_loss is not None else "-"
        dpo = ""
        if record.reward_accuracy is not None:
            dpo = f"  reward acc {record.reward_accuracy:.2f} margin {record.reward_margin:.3f}"
            if record.eval_reward_accuracy is not None:
                dpo += f"  eval acc {record.eval_reward_accuracy:.2f}"
        line = (
            f"step {record.step}/{record.total_steps}  loss {loss}"
            + (f"  eval {record.eval_loss:.4f}" if record.eval_loss is not None else "")
            + (f"  gnorm {record.grad_norm:.3f}" if record.grad_norm is not None else "")
            + dpo
            + f"  lr {record.learning_rate or 0:.2e}  {record.tokens_per_second or 0:,.0f} tok/s"
            + f"  eta {record.eta_seconds or 0:.0f}s"
        )
        err.print(line, highlight=False)
    elif isinstance(record, events.Event):
        err.print(f"[{record.level}] {record.message}", highlight=False, markup=False)
    elif isinstance(record, events.Resumed):
        err.print(f"resumed from step {record.step}", highlight=False)
    elif isinstance(record, events.CheckpointSaved):
        err.print(f"checkpoint step {record.step}: {record.path}", highlight=False)
    elif isinstance(record, events.Error):
        err.print(f"[red]error[/red] {record.message}", highlight=False)


class TinySize(StrEnum):
    """Sizes of the test models (worker/tiny_models.py)."""

    default = "default"
    m5 = "5m"
    m40 = "40m"


class TinyArch(StrEnum):
    """Architectures of the test models."""

    llama = "llama"
    gpt2 = "gpt2"


@models_app.command(
    "make-tiny", epilog=example("lorafleet models make-tiny data/models/tiny-llama")
)
def make_tiny_cmd(
    directory: Annotated[Path, typer.Argument(help="Output folder.")],
    size: Annotated[TinySize, typer.Option(help="Model size.")] = TinySize.default,
    arch: Annotated[TinyArch, typer.Option(help="Architecture.")] = TinyArch.llama,
    chat_template: Annotated[bool, typer.Option(help="Give the tokenizer a chat template.")] = True,
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
) -> None:
    """Write a small random-init model + offline tokenizer loadable with from_pretrained(DIR)."""
    from worker.tiny_models import TINY_SIZES, make_tiny, make_tiny_gpt2

    kwargs: dict[str, Any] = dict(TINY_SIZES[size.value]) if size != TinySize.default else {}
    if arch == TinyArch.gpt2:
        make_tiny_gpt2(directory, seed=seed)
    else:
        make_tiny(directory, seed=seed, chat_template=chat_template, **kwargs)
    print(directory.resolve())


@keys_app.command(
    "create",
    epilog=example(
        "lorafleet keys create --owner alice", "lorafleet keys create --owner ops --admin --json"
    ),
)
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


@app.command(epilog=example("lorafleet demo   # what `make demo` runs"))
def demo() -> None:
    """The whole user path on the embedded defaults (what `make demo` runs)."""
    from cli.demo import main as run_demo

    raise typer.Exit(run_demo())


if __name__ == "__main__":
    app()
