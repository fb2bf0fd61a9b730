"""Every user mistake we could think of, made with the real CLI against a real server: each ends
in one line that says what to fix and a documented exit code, never a traceback."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.http import EXIT_AUTH, EXIT_INVALID, EXIT_UNREACHABLE
from tests.e2e.live import Deployment, chat_rows, deployment, free_port

pytestmark = pytest.mark.xdist_group("live-stack-" + __name__)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_header_dir: Path) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("cli-mistakes")
    with deployment(root, {"tiny": tiny_header_dir}) as dep:
        dep.key = dep.create_key("mistaken")
        dep.start_api()
        dep.env.update({"LORAFLEET_API_URL": dep.url, "LORAFLEET_API_KEY": dep.key})
        yield dep


@pytest.fixture(scope="module")
def tiny_header_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import write_header_model

    return write_header_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(6)))
    return path


def run(
    live: Deployment, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if env is None:
        return live.cli(*args)
    saved = dict(live.env)
    live.env.update(env)
    for name, value in env.items():
        if value == "":
            live.env.pop(name, None)
    try:
        return live.cli(*args)
    finally:
        live.env.clear()
        live.env.update(saved)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.returncode == code, (result.returncode, text)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, text
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_server_not_reachable(live: Deployment) -> None:
    nowhere = {"LORAFLEET_API_URL": f"http://127.0.0.1:{free_port()}"}
    for args in (["status", "ftjob-x"], ["list"], ["files", "list"], ["models", "list"]):
        result = run(live, *args, env=nowhere)
        assert_one_line_error(result, EXIT_UNREACHABLE, "not reachable", "LORAFLEET_API_URL")


def test_missing_and_refused_keys(live: Deployment) -> None:
    missing = run(live, "list", env={"LORAFLEET_API_KEY": ""})
    assert_one_line_error(missing, EXIT_AUTH, "no API key", "LORAFLEET_API_KEY", "keys create")
    refused = run(live, "list", env={"LORAFLEET_API_KEY": "lf-not-a-key"})
    assert_one_line_error(refused, EXIT_AUTH, "refused", "LORAFLEET_API_KEY")
    not_admin = run(live, "keys", "list")
    assert_one_line_error(not_admin, EXIT_AUTH, "admin")


def test_submit_mistakes_upload_nothing(live: Deployment, data: Path, tmp_path: Path) -> None:
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps(chat_rows(1)[0]) + '\n{"oops": 1}\n')
    bad_config = tmp_path / "job.json"
    bad_config.write_text("{not json")
    cases = [
        (["submit", str(tmp_path / "missing.jsonl"), "--base-model", "tiny"], ["no such file"]),
        (["submit", str(tmp_path), "--base-model", "tiny"], ["not a file"]),
        (["submit", str(bad_data), "--base-model", "tiny"], ["line 2"]),
        (
            ["submit", str(data), "--base-model", "tiny", "--validation-file", "nope.jsonl"],
            ["--validation-file", "no such file"],
        ),
        (["submit", str(data), "--base-model", "tiny", "--config", "nope.json"], ["--config"]),
        (["submit", str(data), "--base-model", "tiny", "--config", str(bad_config)], ["not JSON"]),
        (["submit", str(data), "--base-model", "tiny", "--lora-r", "0"], ["lora.r"]),
        (["submit", str(data), "--base-model", "tiny", "--lr", "5"], ["learning_rate"]),
        (["submit", str(data), "--base-model", "tiny", "--batch-size", "0"], ["batch_size"]),
        (["submit", str(data), "--base-model", "tiny", "--suffix", "a:b"], ["suffix"]),
        (["submit", str(data), "--base-model", "tiny", "--method", "ppo"], ["supervised, dpo"]),
        (
            ["submit", str(data), "--base-model", "tiny", "--method", "dpo"],
            ["rows; --method dpo trains on preference pairs"],
        ),
        (["submit", str(data), "--base-model", "llama-70b"], ["not found", "models here: tiny"]),
        (
            ["submit", str(data), "--base-model", "tiny", "--max-seq-length", "100000"],
            ["max_seq_length", "2048"],
        ),
    ]
    for args, words in cases:
        assert_one_line_error(run(live, *args), EXIT_INVALID, *words)
    files = json.loads(run(live, "files", "list", "--json").stdout)["data"]
    # Only the sequence-length case got as far as an upload (the server refuses that one).
    assert len(files) <= 1, files


def test_unknown_objects_and_refused_actions(live: Deployment, data: Path, tmp_path: Path) -> None:
    unknown_job = "ftjob-000000000000000000000000"
    for args in (
        ["status", unknown_job],
        ["cancel", unknown_job],
        ["events", unknown_job],
        ["download", unknown_job, "--out", str(tmp_path / "a")],
        ["jobs", "delete", unknown_job],
        ["jobs", "clone", unknown_job],
        ["files", "show", "file-nope"],
        ["files", "delete", "file-nope"],
    ):
        assert_one_line_error(run(live, *args), EXIT_INVALID, "404")
    assert_one_line_error(run(live, "list", "--status", "bogus"), EXIT_INVALID, "status")

    submitted = run(live, "submit", str(data), "--base-model", "tiny", "--max-steps", "2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[0]
    file_id = json.loads(run(live, "status", job_id, "--json").stdout)["training_file"]
    status = run(live, "status", job_id)
    assert "queued" in status.stdout and "position 1 in the queue" in status.stdout
    assert_one_line_error(run(live, "jobs", "delete", job_id), EXIT_INVALID, "cancel it first")
    assert_one_line_error(run(live, "files", "delete", file_id), EXIT_INVALID, job_id)
    assert_one_line_error(
        run(live, "download", job_id, "--out", str(tmp_path / "b")), EXIT_INVALID, "queued"
    )
    assert_one_line_error(
        run(live, "jobs", "clone", job_id, "--set", "training.batch_size"), EXIT_INVALID, "FIELD="
    )
    assert_one_line_error(
        run(live, "jobs", "clone", job_id, "--set", "training.batch_size=0"),
        EXIT_INVALID,
        "training.batch_size",
    )
    assert_one_line_error(run(live, "keys", "revoke", "lf-secret"), EXIT_INVALID, "id")
    cancelled = run(live, "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert_one_line_error(
        run(live, "download", job_id, "--out", str(blocked / "sub")), EXIT_INVALID, "--out"
    )


def test_local_mistakes(live: Deployment, tmp_path: Path) -> None:
    tiny = run(live, "models", "make-tiny", str(tmp_path / "m"), "--size", "bogus")
    assert tiny.returncode == EXIT_INVALID and "Traceback" not in tiny.stderr
    assert "'bogus' is not one of" in tiny.stderr and "5m" in tiny.stderr
    assert_one_line_error(
        run(live, "merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
        EXIT_INVALID,
        "no such folder",
    )
    (tmp_path / "not-adapter").mkdir()
    assert_one_line_error(
        run(live, "merge", str(tmp_path / "not-adapter"), "--out", str(tmp_path / "o")),
        EXIT_INVALID,
        "adapter_config.json",
    )


def test_every_verb_help_shows_an_example(live: Deployment) -> None:
    verbs = [
        ["submit"], ["status"], ["list"], ["watch"], ["events"], ["cancel"], ["download"],
        ["merge"], ["serve"], ["worker"], ["up"], ["inference"], ["chat"], ["train"], ["demo"],
        ["models", "list"], ["models", "make-tiny"], ["keys", "create"], ["keys", "list"],
        ["keys", "revoke"], ["files", "list"], ["files", "show"], ["files", "delete"],
        ["jobs", "delete"], ["jobs", "clone"],
    ]  # fmt: skip
    for verb in verbs:
        result = run(live, *verb, "--help")
        assert result.returncode == 0, (verb, result.stderr)
        assert "Example" in result.stdout and "lorafleet " + verb[0] in result.stdout, verb
    top = run(live, "--help")
    assert "Exit codes" in top.stdout


def test_dpo_needs_pairs_and_pairs_need_dpo(live: Deployment, tmp_path: Path) -> None:
    """The method and the file's format are checked before anything is uploaded; a preference
    file with --method dpo (or a --config body's method) makes a DPO job."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i}"} for i in range(4)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_one_line_error(
        run(live, "submit", str(pairs), "--base-model", "tiny"),
        EXIT_INVALID,
        "holds preference pairs; train them with --method dpo",
    )
    created = run(live, "submit", str(pairs), "--base-model", "tiny", "--method", "dpo", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["method"]["type"] == "dpo"
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"method": {"type": "dpo", "dpo": {"beta": 0.3}}}))
    configured = run(
        live, "submit", str(pairs), "--base-model", "tiny", "--config", str(config), "--json"
    )
    assert configured.returncode == 0, configured.stderr
    assert json.loads(configured.stdout)["method"]["dpo"]["beta"] == 0.3
