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
    "inference",
    "chat",
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
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lr",
            "0.001",
            "--suffix",
            "cli",
            "--validation-file",
            str(data),
            "--watch",
            timeout=300,
        )
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        job_id = submitted.stdout.strip().splitlines()[0]
        assert job_id.startswith("ftjob-")

        status = json.loads(dep.cli("status", job_id, "--json").stdout)
        assert status["status"] == "succeeded" and status["training"]["max_steps"] == 4
        assert status["lora"]["r"] == 4 and status["lora"]["alpha"] == 8
        assert status["training"]["learning_rate"] == 0.001 and status["validation_file"]
        assert status["training"]["batch_size"] == 2, "--config settings kept beside the flags"
        assert status["fine_tuned_model"] == f"ft:tiny:cli-user:cli:{job_id}"
        human = dep.cli("status", job_id).stdout
        assert "succeeded" in human and "loss" in human and f"lorafleet download {job_id}" in human
        assert job_id in dep.cli("list").stdout
        assert "succeeded" in dep.cli("events", job_id).stdout
        assert dep.cli("watch", job_id).returncode == 0  # exit code = final state

        downloaded = dep.cli("download", job_id, "--out", str(tmp_path / "adapters"), "--json")
        assert downloaded.returncode == 0, downloaded.stderr
        folder = Path(json.loads(downloaded.stdout)["path"])
        assert (folder / "adapter_model.safetensors").exists()
        config_json = json.loads((folder / "adapter_config.json").read_text())
        assert config_json["base_model_name_or_path"] == "tiny", "the public name, no worker path"
        card = (folder / "README.md").read_text()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["dataset_sha256"] in card and "PeftModel.from_pretrained" in card
        assert "vllm serve tiny --enable-lora" in card and "final train loss" in card
        from worker.training.manifest import verify_manifest

        assert verify_manifest(folder) == [], "the manifest covers the card and the config"

        # The base comes from the manifest: no --base-model needed.
        merged = dep.cli("merge", str(folder), "--out", str(tmp_path / "merged"), timeout=300)
        assert merged.returncode == 0, merged.stderr[-2000:]
        assert (tmp_path / "merged" / "config.json").exists()
        # A different base model is refused (the fingerprint covers config and weight files).
        from worker.tiny_models import make_tiny

        other = make_tiny(tmp_path / "other-tiny", seed=1, vocab_size=384)
        refused = dep.cli(
            "merge", str(folder), "--base-model", str(other), "--out", str(tmp_path / "m2")
        )
        assert refused.returncode == 2 and "fingerprint" in refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / "m2").exists()

        unknown = dep.cli("status", "ftjob-000000000000000000000000")
        assert unknown.returncode == 2 and "404" in unknown.stderr
