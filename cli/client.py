"""Client verbs of the CLI: talk to a lorafleet API over HTTP (``LORAFLEET_API_URL``,
``LORAFLEET_API_KEY``)."""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

FINAL = {"succeeded", "failed", "cancelled"}
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}
err = Console(stderr=True)

ApiUrl = Annotated[str, typer.Option("--api-url", envvar="LORAFLEET_API_URL", help="API base URL.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="LORAFLEET_API_KEY", help="Bearer key.")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60.0)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error", {}).get("message") or body
        except ValueError:
            detail = response.text
        err.print(f"[red]HTTP {response.status_code}[/red]: {detail}")
        raise typer.Exit(2)
    return response.json() if response.content else None


def _out(obj: Any, as_json: bool, summary: str) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
    else:
        print(summary)


def upload_file(http: httpx.Client, path: Path) -> dict[str, Any]:
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
            response = http.post("/files", files=files, data={"purpose": "fine-tune"})  # type: ignore[arg-type]
            return _check(response)  # type: ignore[no-any-return]


def watch_job(http: httpx.Client, job_id: str, as_json: bool = False) -> str:
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
            progress = _check(http.get(f"/jobs/{job_id}/progress"))
            status = progress["status"]
            if as_json:
                print(json.dumps(progress), flush=True)
            info = status
            if progress.get("train_loss") is not None:
                info += f" loss {progress['train_loss']:.4f}"
            if progress.get("tokens_per_second"):
                info += f" {progress['tokens_per_second']:,.0f} tok/s"
            if progress.get("eta_seconds") is not None and status == "running":
                info += f" eta {progress['eta_seconds']:.0f}s"
            bar.update(
                task,
                total=progress.get("total_steps") or None,
                completed=progress.get("step") or 0,
                info=info,
            )
            if status in FINAL:
                return str(status)
            time.sleep(1.0)


def download_adapter(http: httpx.Client, job_id: str, dest: Path) -> Path:
    """Stream the adapter tarball, verify its sha256, unpack into ``dest``; returns the folder."""
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / f"{job_id}.adapter.tar.gz"
    digest = hashlib.sha256()
    with http.stream("GET", f"/jobs/{job_id}/adapter") as response:
        if response.status_code >= 400:
            response.read()
            _check(response)
        expected = response.headers.get("x-checksum-sha256") or response.headers.get("etag", "")
        total = int(response.headers.get("content-length") or 0) or None
        with open(tarball, "wb") as out, Progress(console=err) as bar:
            task = bar.add_task("download", total=total)
            for chunk in response.iter_bytes():
                out.write(chunk)
                digest.update(chunk)
                bar.update(task, advance=len(chunk))
    expected = expected.strip('"')
    if expected and digest.hexdigest() != expected:
        tarball.unlink()
        err.print(f"[red]sha256 mismatch[/red]: got {digest.hexdigest()}, expected {expected}")
        raise typer.Exit(4)
    folder = dest / job_id
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    tarball.unlink()
    adapter = folder / "adapter"
    return adapter if adapter.is_dir() else folder


def register(app: typer.Typer) -> None:
    @app.command()
    def submit(
        training_file: Annotated[Path, typer.Argument(help="Local JSONL dataset.")],
        base_model: Annotated[str, typer.Option(help="Model folder name or hub id.")],
        validation_file: Annotated[Path | None, typer.Option(help="Optional JSONL.")] = None,
        config: Annotated[Path | None, typer.Option(help="JSON with lora/training keys.")] = None,
        max_steps: Annotated[int | None, typer.Option(help="training.max_steps")] = None,
        epochs: Annotated[int | None, typer.Option(help="training.epochs")] = None,
        watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Upload the dataset(s) and create a job."""
        with _client(api_url, api_key) as http:
            train_id = upload_file(http, training_file)["id"]
            body: dict[str, Any] = json.loads(config.read_text()) if config else {}
            body.update({"base_model": base_model, "training_file": train_id})
            if validation_file:
                body["validation_file"] = upload_file(http, validation_file)["id"]
            training = body.setdefault("training", {})
            if max_steps is not None:
                training["max_steps"] = max_steps
            if epochs is not None:
                training["epochs"] = epochs
            job = _check(http.post("/jobs", json=body))
            _out(job, as_json, job["id"])
            if watch:
                raise typer.Exit(EXIT_CODES.get(watch_job(http, job["id"], as_json), 1))

    @app.command()
    def status(
        job_id: str,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Show a job."""
        with _client(api_url, api_key) as http:
            job = _check(http.get(f"/jobs/{job_id}"))
            progress = job.get("progress") or {}
            step = f"{progress.get('step')}/{progress.get('total_steps')}"
            summary = f"{job['id']} {job['status']} step {step}"
            if job.get("error"):
                summary += f" error {job['error']['code']}: {job['error']['message']}"
            _out(job, as_json, summary)

    @app.command("list")
    def list_jobs(
        status_filter: Annotated[str | None, typer.Option("--status", help="Filter.")] = None,
        limit: int = 20,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """List jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status_filter:
            params["status"] = status_filter
        with _client(api_url, api_key) as http:
            page = _check(http.get("/jobs", params=params))
        lines = [f"{j['id']}  {j['status']:<10} {j['base_model']}" for j in page["data"]]
        _out(page, as_json, "\n".join(lines))

    @app.command()
    def watch(
        job_id: str,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Live progress until the job ends; exit code 0 succeeded, 1 failed, 3 cancelled."""
        with _client(api_url, api_key) as http:
            final = watch_job(http, job_id, as_json)
        err.print(f"{job_id} {final}")
        raise typer.Exit(EXIT_CODES.get(final, 1))

    @app.command()
    def events(
        job_id: str,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Print a job's events."""
        with _client(api_url, api_key) as http:
            page = _check(http.get(f"/jobs/{job_id}/events"))
        lines = [f"{e['created_at']}  {e['level']:<7} {e['message']}" for e in page["data"]]
        _out(page, as_json, "\n".join(lines))

    @app.command()
    def logs(
        job_id: str,
        attempt: Annotated[
            int | None, typer.Option("--attempt", help="Attempt number; default the last.")
        ] = None,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
    ) -> None:
        """Print the rank logs kept for a job's attempt.

        Example: lorafleet logs ftjob-abc123 --attempt 1
        """
        params = {"attempt": attempt} if attempt is not None else {}
        with _client(api_url, api_key) as http:
            response = http.get(f"/jobs/{job_id}/logs", params=params)
            if response.status_code >= 400:
                _check(response)
        print(response.text, end="")

    @app.command()
    def cancel(
        job_id: str,
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Cancel a queued or running job."""
        with _client(api_url, api_key) as http:
            job = _check(http.post(f"/jobs/{job_id}/cancel"))
        _out(job, as_json, f"{job['id']} {job['status']}")

    @app.command()
    def download(
        job_id: str,
        out: Annotated[Path, typer.Option("--out", help="Destination folder.")] = Path("adapters"),
        api_url: ApiUrl = "http://127.0.0.1:8000",
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Download, verify (sha256) and unpack a job's adapter; prints its folder."""
        with _client(api_url, api_key) as http:
            folder = download_adapter(http, job_id, out)
        _out({"path": str(folder.resolve())}, as_json, str(folder.resolve()))

    @app.command()
    def merge(
        adapter: Annotated[Path, typer.Argument(help="Downloaded adapter folder.")],
        base_model: Annotated[str, typer.Option(help="Base model path or name.")],
        out: Annotated[Path, typer.Option("--out", help="Merged model folder.")],
    ) -> None:
        """Merge an adapter into its base model (peft merge_and_unload) for plain serving."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from shared.config import get_settings

        folder = get_settings().models_path / base_model
        base_path = str(folder) if folder.is_dir() else base_model
        model = AutoModelForCausalLM.from_pretrained(base_path)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(base_path).save_pretrained(str(out))
        print(out.resolve())
