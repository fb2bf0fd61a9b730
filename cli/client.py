"""Client verbs of the CLI: talk to a lorafleet API over HTTP (``LORAFLEET_API_URL``,
``LORAFLEET_API_KEY``). Job verbs live here; files, models, keys and ``jobs`` in
``cli/resources.py``. Failures are ``CliError`` (``cli/http.py``): one line, a documented exit
code, never a traceback."""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cli.http import (
    EXIT_CANCELLED,
    EXIT_CHECKSUM,
    EXIT_INVALID,
    EXIT_JOB_FAILED,
    EXIT_OK,
    Api,
    CliError,
    connect,
)

FINAL = {"succeeded", "failed", "cancelled"}
EXIT_CODES = {"succeeded": EXIT_OK, "failed": EXIT_JOB_FAILED, "cancelled": EXIT_CANCELLED}
METHODS = ("supervised", "dpo")
err = Console(stderr=True, soft_wrap=True)

ApiUrl = Annotated[str, typer.Option("--api-url", envvar="LORAFLEET_API_URL", help="API base URL.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="LORAFLEET_API_KEY", help="Bearer key.")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def example(*lines: str) -> str:
    """An ``epilog`` for ``--help``: the verb's usual invocations."""
    return "Example:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def out(obj: Any, as_json: bool, summary: str) -> None:
    """JSON for programs (``--json``), the summary for people."""
    print(json.dumps(obj, indent=2) if as_json else summary)


def duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 20s``, ``45s``: how long, for people."""
    if seconds is None:
        return "–"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def describe(job: dict[str, Any]) -> str:
    """One line about a job: status, and what a person asks next (where it is, when done)."""
    progress = job.get("progress") or {}
    parts = [f"{job['id']} {job['status']}"]
    if job["status"] == "queued":
        place = job.get("queue_position")
        parts.append(f"position {place} in the queue" if place else "waiting for a worker")
    step, total = progress.get("step"), progress.get("total_steps")
    if step is not None and total:
        parts.append(f"step {step}/{total} ({100 * step / total:.0f}%)")
    if progress.get("train_loss") is not None:
        parts.append(f"loss {progress['train_loss']:.4f}")
    if progress.get("eval_loss") is not None:
        parts.append(f"eval loss {progress['eval_loss']:.4f}")
    if progress.get("reward_accuracy") is not None:  # DPO
        parts.append(
            f"reward accuracy {progress['reward_accuracy']:.2f} "
            f"margin {progress.get('reward_margin') or 0:.3f}"
        )
    if progress.get("eval_reward_accuracy") is not None:
        parts.append(f"eval reward accuracy {progress['eval_reward_accuracy']:.2f}")
    if progress.get("tokens_per_second") and job["status"] == "running":
        parts.append(f"{progress['tokens_per_second']:,.0f} tok/s")
    if job["status"] == "running":
        if job.get("cancel_requested"):
            parts.append("cancel requested: stopping")
        elif progress.get("eta_seconds") is not None:
            parts.append(f"ETA {duration(progress['eta_seconds'])}")
    if job.get("fine_tuned_model"):
        parts.append(f"model {job['fine_tuned_model']}")
    if job.get("error"):
        parts.append(f"error {job['error']['code']}: {job['error']['message']}")
    if job.get("deleted_at"):
        parts.append("deleted (artifacts removed)")
    return " · ".join(parts)


# ------------------------------------------------------------------------------ local checks
def check_dataset(path: Path, option: str, method: str = "supervised") -> None:
    """Refuse a dataset before anything is uploaded: missing, unreadable, invalid, or of a
    format the training method cannot use (DPO trains on preference pairs, and only DPO does)."""
    from shared.datasets import PREFERENCE, DatasetError, summarize

    if not path.exists():
        raise CliError(f"{option} {path}: no such file")
    if not path.is_file():
        raise CliError(f"{option} {path}: not a file")
    try:
        with open(path, "rb") as stream:
            summary = summarize(stream)
    except PermissionError:
        raise CliError(f"{option} {path}: not readable (permission denied)") from None
    except DatasetError as exc:
        raise CliError(f"{option} {path}: invalid dataset: {exc}") from None
    if method == "dpo" and summary.format != PREFERENCE:
        raise CliError(
            f"{option} {path}: holds {summary.format} rows; --method dpo trains on preference "
            "pairs ({prompt, chosen, rejected} or OpenAI's {input, preferred_output, "
            "non_preferred_output} rows)"
        )
    if method != "dpo" and summary.format == PREFERENCE:
        raise CliError(f"{option} {path}: holds preference pairs; train them with --method dpo")


def check_body(body: dict[str, Any]) -> None:
    """Validate a job body locally, with the same schema the server uses."""
    from shared.spec import JobSpec

    try:
        JobSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise CliError(f"{field}: {first.get('msg')}") from None


def check_model(api: Api, name: str) -> None:
    """Refuse a base model the server does not have (hub ids are left to the server)."""
    if "/" in name:
        return
    listing = api.get("/models")
    names = [m["id"] for m in listing.get("data", [])]
    if name not in names:
        raise CliError(
            f"base model {name!r} not found on this server; models here: "
            f"{', '.join(names) or 'none'} (`lorafleet models list`), or a hub id org/name"
        )


def check_server_method(api: Api, method: str) -> None:
    """Refuse a method the server's job body does not have (an older server)."""
    if method == "supervised":
        return
    schema = api.get("/openapi.json")
    job_fields = schema.get("components", {}).get("schemas", {}).get("JobSpec", {})
    if "method" not in job_fields.get("properties", {}):
        raise CliError(
            f"--method {method}: this server does not train {method} yet (its job body has no "
            "`method`); use --method supervised"
        )


# ------------------------------------------------------------------------------ transfers
def upload_file(api: Api, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
    """Upload a dataset with a progress bar; the server answers with the stored file."""
    size = path.stat().st_size
    with Progress(
        TextColumn("upload {task.description}"), BarColumn(), TimeRemainingColumn(), console=err
    ) as bar:
        task = bar.add_task(path.name, total=size)

        class Reader:
            def __init__(self, stream: Any) -> None:
                self.stream = stream

            def read(self, n: int = -1) -> bytes:
                data = self.stream.read(n)
                bar.update(task, advance=len(data))
                return data

        with open(path, "rb") as stream:
            files = {"file": (path.name, Reader(stream), "application/jsonl")}
            return api.post("/files", files=files, data={"purpose": purpose})  # type: ignore[no-any-return]


def watch_job(api: Api, job_id: str, as_json: bool = False) -> str:
    """Follow a job with a live bar until it ends; returns the final status."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
        console=err,
        disable=as_json,
    ) as bar:
        task = bar.add_task(job_id, total=None, info="")
        while True:
            job = api.get(f"/jobs/{job_id}")
            progress = job.get("progress") or {}
            status = job["status"]
            if as_json:
                print(json.dumps({**progress, "status": status}), flush=True)
            bar.update(
                task,
                total=progress.get("total_steps") or None,
                completed=progress.get("step") or 0,
                info=describe(job).split(" · ", 1)[-1] if " · " in describe(job) else status,
            )
            if status in FINAL:
                return str(status)
            time.sleep(1.0)


def download_adapter(http: httpx.Client, job_id: str, dest: Path) -> Path:
    """Stream the adapter tarball, verify its sha256, unpack into ``dest``; returns the folder."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {dest}: cannot create the folder ({exc.strerror})") from None
    tarball = dest / f"{job_id}.adapter.tar.gz"
    digest = hashlib.sha256()
    with http.stream("GET", f"/jobs/{job_id}/adapter") as response:
        if response.status_code >= 400:
            response.read()
            message = _message(response)
            raise CliError(f"{message} (HTTP {response.status_code})")
        expected = response.headers.get("x-checksum-sha256") or response.headers.get("etag", "")
        total = int(response.headers.get("content-length") or 0) or None
        with open(tarball, "wb") as stream, Progress(console=err) as bar:
            task = bar.add_task("download", total=total)
            for chunk in response.iter_bytes():
                stream.write(chunk)
                digest.update(chunk)
                bar.update(task, advance=len(chunk))
    expected = expected.strip('"')
    if expected and digest.hexdigest() != expected:
        tarball.unlink()
        raise CliError(
            f"sha256 mismatch: got {digest.hexdigest()}, expected {expected}; download again",
            EXIT_CHECKSUM,
        )
    folder = dest / job_id
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    tarball.unlink()
    adapter = folder / "adapter"
    return adapter if adapter.is_dir() else folder


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("detail") or body.get("error", {}).get("message") or body)
    except ValueError:
        return response.text[:300]


# ------------------------------------------------------------------------------ verbs
def register(app: typer.Typer) -> None:
    @app.command(
        epilog=example(
            "lorafleet submit data.jsonl --base-model tiny-llama --max-steps 100 --watch",
            "lorafleet submit data.jsonl --base-model tiny-llama --lora-r 16 --lr 1e-4 "
            "--validation-file valid.jsonl --suffix support-bot",
        )
    )
    def submit(
        training_file: Annotated[Path, typer.Argument(help="Local JSONL dataset.")],
        base_model: Annotated[
            str, typer.Option(help="Model name on the server (`lorafleet models list`) or hub id.")
        ],
        validation_file: Annotated[
            Path | None, typer.Option(help="JSONL for the eval loss.")
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="JSON job body to start from (flags override it).")
        ] = None,
        max_steps: Annotated[int | None, typer.Option(help="training.max_steps.")] = None,
        epochs: Annotated[int | None, typer.Option(help="training.epochs.")] = None,
        lora_r: Annotated[int | None, typer.Option(help="lora.r: adapter rank (8).")] = None,
        lora_alpha: Annotated[float | None, typer.Option(help="lora.alpha (16).")] = None,
        lr: Annotated[
            float | None, typer.Option("--lr", help="training.learning_rate (2e-4).")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option(help="training.batch_size per device (4).")
        ] = None,
        max_seq_length: Annotated[
            int | None, typer.Option(help="training.max_seq_length (512).")
        ] = None,
        suffix: Annotated[
            str | None, typer.Option(help="Label in the fine-tuned model name.")
        ] = None,
        method: Annotated[
            str | None,
            typer.Option(
                help="Training method: supervised or dpo (default: the --config body's, "
                "else supervised)."
            ),
        ] = None,
        watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Check the dataset and settings, upload, and create a job (prints its id)."""
        if method is not None and method not in METHODS:
            raise CliError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        body: dict[str, Any] = {}
        if config is not None:
            try:
                body = json.loads(config.read_text())
            except OSError as exc:
                raise CliError(f"--config {config}: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise CliError(f"--config {config}: not JSON ({exc})") from None
            if not isinstance(body, dict):
                raise CliError(f"--config {config}: must hold a JSON object (a job body)")
        configured = body.get("method")
        if method is None:
            method = str((configured or {}).get("type") or "supervised")
        training = dict(body.get("training") or {})
        lora = dict(body.get("lora") or {})
        for target, key, value in (
            (training, "max_steps", max_steps),
            (training, "epochs", epochs),
            (training, "learning_rate", lr),
            (training, "batch_size", batch_size),
            (training, "max_seq_length", max_seq_length),
            (lora, "r", lora_r),
            (lora, "alpha", lora_alpha),
        ):
            if value is not None:
                target[key] = value
        body.update({"base_model": base_model, "training": training, "lora": lora})
        if not (isinstance(configured, dict) and configured.get("type") == method):
            body.pop("method", None)
            if method != "supervised":
                body["method"] = {"type": method}
        if suffix is not None:
            body["suffix"] = suffix
        body["training_file"] = "file-pending-upload"
        if validation_file is not None:
            body["validation_file"] = "file-pending-upload"
        check_body(body)  # every flag checked before anything is uploaded
        check_dataset(training_file, "training file", method)
        if validation_file is not None:
            check_dataset(validation_file, "--validation-file", method)
        with connect(api_url, api_key) as api:
            check_model(api, base_model)
            check_server_method(api, method)
            body["training_file"] = upload_file(api, training_file)["id"]
            if validation_file is not None:
                body["validation_file"] = upload_file(api, validation_file, "validation")["id"]
            job = api.post("/jobs", json=body)
            out(job, as_json, job["id"])
            if not as_json:
                err.print(describe(job), highlight=False)
            if watch:
                raise typer.Exit(EXIT_CODES.get(watch_job(api, job["id"], as_json), 1))

    @app.command(epilog=example("lorafleet status ftjob-...", "lorafleet status ftjob-... --json"))
    def status(
        job_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Where a job is: status, step, loss, ETA, queue position or error."""
        with connect(api_url, api_key) as api:
            job = api.get(f"/jobs/{job_id}")
        summary = describe(job)
        if job["status"] == "failed":
            summary += f"\nlogs: lorafleet logs {job['id']}"
        elif job["status"] == "succeeded" and not job.get("deleted_at"):
            summary += f"\ndownload: lorafleet download {job['id']}"
        out(job, as_json, summary)

    @app.command("list", epilog=example("lorafleet list", "lorafleet list --status running"))
    def list_jobs(
        status_filter: Annotated[
            str | None,
            typer.Option("--status", help="queued, running, succeeded, failed or cancelled."),
        ] = None,
        limit: Annotated[int, typer.Option(help="How many (1-100).", min=1, max=100)] = 20,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Your jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status_filter:
            params["status"] = status_filter
        with connect(api_url, api_key) as api:
            page = api.get("/jobs", params=params)
        lines = [f"{'JOB':<30} {'STATUS':<10} {'PROGRESS':<10} {'LOSS':>8}  {'MODEL':<24} CREATED"]
        for job in page["data"]:
            progress = job.get("progress") or {}
            step, total = progress.get("step"), progress.get("total_steps")
            done = f"{step}/{total}" if step is not None and total else "–"
            if job["status"] == "queued" and job.get("queue_position"):
                done = f"#{job['queue_position']}"
            loss = progress.get("train_loss")
            lines.append(
                f"{job['id']:<30} {job['status']:<10} {done:<10} "
                f"{(f'{loss:.4f}' if loss is not None else '–'):>8}  "
                f"{job['base_model'][:24]:<24} {job['created_at'][:19].replace('T', ' ')}"
            )
        if not page["data"]:
            lines.append("(no jobs yet: lorafleet submit DATA.jsonl --base-model NAME)")
        out(page, as_json, "\n".join(lines))

    @app.command(epilog=example("lorafleet watch ftjob-... && lorafleet download ftjob-..."))
    def watch(
        job_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Live progress until the job ends; exit code 0 succeeded, 1 failed, 3 cancelled."""
        with connect(api_url, api_key) as api:
            final = watch_job(api, job_id, as_json)
            err.print(describe(api.get(f"/jobs/{job_id}")), highlight=False)
        raise typer.Exit(EXIT_CODES.get(final, 1))

    @app.command(epilog=example("lorafleet events ftjob-..."))
    def events(
        job_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """A job's history, oldest first."""
        with connect(api_url, api_key) as api:
            page = api.get(f"/jobs/{job_id}/events")
        lines = [
            f"{e['created_at'][:19].replace('T', ' ')}  {e['level']:<7} {e['message']}"
            for e in page["data"]
        ]
        out(page, as_json, "\n".join(lines))

    @app.command(epilog=example("lorafleet logs ftjob-...", "lorafleet logs ftjob-... --attempt 1"))
    def logs(
        job_id: str,
        attempt: Annotated[
            int | None, typer.Option("--attempt", help="Attempt number; default the last.")
        ] = None,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
    ) -> None:
        """Print the rank logs kept for a job's attempt (kept whatever the outcome)."""
        params = {"attempt": attempt} if attempt is not None else {}
        with connect(api_url, api_key) as api:
            try:
                response = api.http.get(f"/jobs/{job_id}/logs", params=params)
            except httpx.TransportError as exc:
                raise api.unreachable(exc) from None
            if response.status_code >= 400:
                api.check(response)
        print(response.text, end="")

    @app.command(epilog=example("lorafleet cancel ftjob-..."))
    def cancel(
        job_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Cancel a queued (at once) or running job (its worker stops it within seconds)."""
        with connect(api_url, api_key) as api:
            job = api.post(f"/jobs/{job_id}/cancel")
        if job["status"] == "running":
            summary = f"{job['id']} cancel requested: the worker stops it within seconds"
        else:
            summary = f"{job['id']} {job['status']}"
        out(job, as_json, summary)

    @app.command(epilog=example("lorafleet download ftjob-... --out adapters"))
    def download(
        job_id: str,
        out_dir: Annotated[Path, typer.Option("--out", help="Destination folder.")] = Path(
            "adapters"
        ),
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Download, verify (sha256) and unpack a job's adapter; prints its folder."""
        with connect(api_url, api_key) as api:
            try:
                folder = download_adapter(api.http, job_id, out_dir)
            except httpx.TransportError as exc:
                raise api.unreachable(exc) from None
        out({"path": str(folder.resolve())}, as_json, str(folder.resolve()))

    @app.command(
        epilog=example(
            "lorafleet merge adapters/ftjob-.../adapter --out merged",
            "lorafleet merge ADAPTER --base-model ./my-copy-of-the-base --out merged",
        )
    )
    def merge(
        adapter: Annotated[Path, typer.Argument(help="Downloaded adapter folder.")],
        out_dir: Annotated[Path, typer.Option("--out", help="Merged model folder.")],
        base_model: Annotated[
            str | None,
            typer.Option(help="Base model folder name, path or hub id (default: the manifest's)."),
        ] = None,
        force: Annotated[
            bool, typer.Option(help="Merge even if the base's fingerprint differs.")
        ] = False,
    ) -> None:
        """Merge an adapter into its base model (peft merge_and_unload) for plain serving.

        The base comes from the adapter's manifest.json; a base whose fingerprint differs from
        the one the adapter was trained on is refused unless --force.
        """
        from cli.merging import merge_adapter

        merge_adapter(adapter, out_dir, base_model, force)
        print(out_dir.resolve())


__all__ = ["EXIT_INVALID", "download_adapter", "register", "upload_file", "watch_job"]
