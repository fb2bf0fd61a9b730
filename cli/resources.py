"""Managing what you created: ``files list|show|delete``, ``models list``, ``keys list|revoke``,
``jobs delete|clone``. Each verb is one API call; output is a table for people, ``--json`` for
programs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from cli.client import DEFAULT_URL, ApiKey, ApiUrl, JsonFlag, describe, example, out
from cli.http import CliError, connect


def _size(count: int | None) -> str:
    if count is None:
        return "–"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(count)


def _params(count: int | None) -> str:
    if count is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def register(app: typer.Typer, models_app: typer.Typer, keys_app: typer.Typer) -> None:
    files_app = typer.Typer(help="Uploaded datasets.", no_args_is_help=True)
    jobs_app = typer.Typer(help="Jobs: delete, clone.", no_args_is_help=True)
    app.add_typer(files_app, name="files")
    app.add_typer(jobs_app, name="jobs")

    # ------------------------------------------------------------------------------ files
    @files_app.command("list", epilog=example("lorafleet files list"))
    def files_list(
        limit: Annotated[int, typer.Option(help="How many (1-1000).", min=1, max=1000)] = 100,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Your uploaded files, newest first."""
        with connect(api_url, api_key) as api:
            page = api.get("/files", params={"limit": limit})
        lines = [f"{'FILE':<30} {'ROWS':>7} {'SIZE':>9}  {'FORMAT':<10} {'PURPOSE':<10} NAME"]
        for f in page["data"]:
            lines.append(
                f"{f['id']:<30} {f['rows']:>7} {_size(f['bytes']):>9}  {f['format']:<10} "
                f"{f['purpose']:<10} {f['filename']}"
            )
        if not page["data"]:
            lines.append("(no files yet: lorafleet submit DATA.jsonl ... uploads one)")
        out(page, as_json, "\n".join(lines))

    @files_app.command("show", epilog=example("lorafleet files show file-..."))
    def files_show(
        file_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """One file's record (rows, format, sha256)."""
        with connect(api_url, api_key) as api:
            record = api.get(f"/files/{file_id}")
        summary = "\n".join(f"{k}: {v}" for k, v in record.items())
        out(record, as_json, summary)

    @files_app.command("delete", epilog=example("lorafleet files delete file-..."))
    def files_delete(
        file_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Delete a file (refused while a queued or running job uses it)."""
        with connect(api_url, api_key) as api:
            record = api.delete(f"/files/{file_id}")
        out(record, as_json, f"deleted {record['id']} ({record['filename']})")

    # ------------------------------------------------------------------------------ models
    @models_app.command("list", epilog=example("lorafleet models list"))
    def models_list(
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Base models on the server: parameters, context length, chat template."""
        with connect(api_url, api_key) as api:
            page = api.get("/models")
        lines = [f"{'MODEL':<32} {'PARAMS':>8} {'CONTEXT':>8}  {'CHAT TEMPLATE':<14} TYPE"]
        for m in page["data"]:
            if m.get("error"):
                lines.append(f"{m['id']:<32} unusable: {m['error']}")
                continue
            lines.append(
                f"{m['id']:<32} {_params(m['parameters']):>8} {m['context_length'] or '–':>8}  "
                f"{'yes' if m['chat_template'] else 'no':<14} {m.get('model_type') or ''}"
            )
        allowed = page.get("allowed_hub_models", "")
        lines.append(f"hub ids allowed: {allowed!r}" if allowed else "hub ids: none allowed")
        out(page, as_json, "\n".join(lines))

    # ------------------------------------------------------------------------------ keys
    @keys_app.command(
        "list", epilog=example("lorafleet keys list", "lorafleet keys list --owner alice")
    )
    def keys_list(
        owner: Annotated[str | None, typer.Option(help="Only this owner's keys.")] = None,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """API keys (never their secrets); needs an admin key."""
        with connect(api_url, api_key) as api:
            page = api.get("/keys", params={"owner": owner} if owner else None)
        lines = [f"{'KEY':<30} {'OWNER':<20} {'ADMIN':<6} {'CREATED':<20} REVOKED"]
        for k in page["data"]:
            lines.append(
                f"{k['id']:<30} {k['owner'][:20]:<20} {'yes' if k['admin'] else 'no':<6} "
                f"{k['created_at'][:19].replace('T', ' '):<20} "
                f"{(k['revoked_at'] or '–')[:19].replace('T', ' ')}"
            )
        out(page, as_json, "\n".join(lines))

    @keys_app.command("revoke", epilog=example("lorafleet keys revoke key-..."))
    def keys_revoke(
        key_id: Annotated[str, typer.Argument(help="The key's id (key-...), not its secret.")],
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Revoke a key at once; needs an admin key."""
        if key_id.startswith("lf-"):
            raise CliError("give the key's id (key-..., see `lorafleet keys list`), not its secret")
        with connect(api_url, api_key) as api:
            record = api.post(f"/keys/{key_id}/revoke")
        out(record, as_json, f"revoked {record['id']} (owner {record['owner']})")

    # ------------------------------------------------------------------------------ jobs
    @jobs_app.command("delete", epilog=example("lorafleet jobs delete ftjob-..."))
    def jobs_delete(
        job_id: str,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Delete a finished job's adapter, checkpoints and logs (the record stays)."""
        with connect(api_url, api_key) as api:
            job = api.delete(f"/jobs/{job_id}")
        out(job, as_json, f"deleted the artifacts of {job['id']} (the job record stays)")

    @jobs_app.command(
        "clone",
        epilog=example(
            "lorafleet jobs clone ftjob-... --set training.learning_rate=1e-4 --set suffix=lr-low",
            'lorafleet jobs clone ftjob-... --overrides \'{"lora": {"r": 16}}\'',
        ),
    )
    def jobs_clone(
        job_id: str,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set", help="FIELD=VALUE to change (dotted field; VALUE is JSON or text)."
            ),
        ] = None,
        overrides: Annotated[
            str | None, typer.Option(help="JSON object merged into the job body.")
        ] = None,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
        as_json: JsonFlag = False,
    ) -> None:
        """A new job with this job's settings, changed by --set / --overrides."""
        body: dict[str, Any] = {}
        if overrides:
            try:
                body = json.loads(overrides)
            except ValueError as exc:
                raise CliError(f"--overrides: not JSON ({exc})") from None
            if not isinstance(body, dict):
                raise CliError("--overrides: must be a JSON object")
        for item in set_ or []:
            field, sep, raw = item.partition("=")
            if not sep or not field.strip():
                raise CliError(f"--set {item!r}: write FIELD=VALUE, e.g. training.max_steps=50")
            try:
                value: Any = json.loads(raw)
            except ValueError:
                value = raw
            target = body
            parts = field.strip().split(".")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise CliError(f"--set {item!r}: {part} is not an object")
            target[parts[-1]] = value
        with connect(api_url, api_key) as api:
            job = api.post(f"/jobs/{job_id}/clone", json=body)
        out(job, as_json, job["id"])
        if not as_json:
            from cli.client import err

            err.print(describe(job), highlight=False)
