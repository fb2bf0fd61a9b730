"""The CLI client verbs against a live server and worker, as a user at a terminal runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.live import chat_rows, deployment

VERBS = [
    "submit",
    "status",
    "list",
    "watch",
    "events",
    "cancel",
    "download",
    "merge",
    "train",
    "serve",
    "worker",
    "up",
    "demo",
    "models",
    "keys",
]


def test_every_verb_has_help(tmp_path: Path) -> None:
    with deployment(tmp_path, {}) as dep:
        for verb in VERBS:
            result = dep.cli(verb, "--help")
            assert result.returncode == 0, (verb, result.stderr)
            assert "Usage" in result.stdout


@pytest.mark.slow
def test_submit_watch_download_merge(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        key = dep.create_key("cli-user")
        dep.start_api()
        dep.start_worker()
        dep.env.update({"LORAFLEET_API_URL": dep.url, "LORAFLEET_API_KEY": key})
        data = tmp_path / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(20)))
        config = tmp_path / "job.json"
        config.write_text(json.dumps({"training": {"batch_size": 2, "max_seq_length": 128}}))
        submitted = dep.cli(
            "submit",
            str(data),
            "--base-model",
            "tiny",
            "--config",
            str(config),
            "--max-steps",
            "4",
            "--watch",
            timeout=300,
        )
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        job_id = submitted.stdout.strip().splitlines()[0]
        assert job_id.startswith("ftjob-")

        status = json.loads(dep.cli("status", job_id, "--json").stdout)
        assert status["status"] == "succeeded" and status["training"]["max_steps"] == 4
        assert job_id in dep.cli("list").stdout
        assert "succeeded" in dep.cli("events", job_id).stdout
        assert dep.cli("watch", job_id).returncode == 0  # exit code = final state

        downloaded = dep.cli("download", job_id, "--out", str(tmp_path / "adapters"), "--json")
        assert downloaded.returncode == 0, downloaded.stderr
        folder = Path(json.loads(downloaded.stdout)["path"])
        assert (folder / "adapter_model.safetensors").exists()
        merged = dep.cli(
            "merge",
            str(folder),
            "--base-model",
            "tiny",
            "--out",
            str(tmp_path / "merged"),
            timeout=300,
        )
        assert merged.returncode == 0, merged.stderr[-2000:]
        assert (tmp_path / "merged" / "config.json").exists()

        unknown = dep.cli("status", "ftjob-000000000000000000000000")
        assert unknown.returncode == 2 and "404" in unknown.stderr
