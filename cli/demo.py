"""``make demo``: the whole user path on the embedded defaults, from a fresh clone.

Builds the demo model if missing, starts API + worker + inference server (``lorafleet up``),
creates an API key, submits the sample dataset over HTTP, follows progress, downloads and verifies
the adapter, loads it with peft, asks the trained model one question of the sample through
``/v1/chat/completions`` and prints the answer, prints the adapter's path on the last line, and
stops what it started. Exit 0 only if all of that worked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cli.client import download_adapter
from shared.config import get_settings

DEMO_MODEL = "tiny-llama"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_chat.jsonl"
DEMO_JOB: dict[str, Any] = {
    "base_model": DEMO_MODEL,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    "training": {
        "epochs": 1,
        "max_steps": 60,
        "batch_size": 4,
        "learning_rate": 0.01,
        "max_seq_length": 256,
        "seed": 0,
        "checkpoint_every_steps": 20,
    },
}


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    from worker.training.launch import free_port

    return free_port()


def _wait_ready(http: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorafleet up exited with {proc.returncode}")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the API did not become ready in time")


def main() -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    model_dir = settings.models_path / DEMO_MODEL
    if not (model_dir / "config.json").exists():
        from worker.tiny_models import make_tiny

        say(f"building the demo model in {model_dir}")
        make_tiny(model_dir)
    from shared.db import session_scope, upgrade_to_head
    from shared.services.keys import create_key

    upgrade_to_head()
    with session_scope() as session:
        key, _ = create_key(session, "demo", admin=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"starting API + worker on {url} (data in {settings.data_dir.resolve()})")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port)],
        env={**os.environ},
        start_new_session=True,
    )
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as http:
            _wait_ready(http, proc)
            with open(SAMPLE, "rb") as stream:
                upload = http.post("/files", files={"file": (SAMPLE.name, stream)})
            upload.raise_for_status()
            file_obj = upload.json()
            say(f"uploaded {file_obj['filename']}: {file_obj['rows']} rows ({file_obj['format']})")
            body = {**DEMO_JOB, "training_file": file_obj["id"]}
            created = http.post("/jobs", json=body)
            if created.status_code >= 400:
                raise RuntimeError(f"POST /jobs: {created.status_code} {created.text}")
            job = created.json()
            say(f"job {job['id']} {job['status']}")
            last_step = -1
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                progress = http.get(f"/jobs/{job['id']}/progress").json()
                if progress.get("step") is not None and progress["step"] != last_step:
                    last_step = progress["step"]
                    say(
                        f"step {progress['step']}/{progress['total_steps']} "
                        f"loss {progress['train_loss']:.4f} "
                        f"{progress.get('tokens_per_second') or 0:,.0f} tok/s"
                    )
                if progress["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1.0)
            final = http.get(f"/jobs/{job['id']}").json()
            if final["status"] != "succeeded":
                raise RuntimeError(f"job ended {final['status']}: {json.dumps(final.get('error'))}")
            folder = download_adapter(http, job["id"], Path("adapters"))
            _check_adapter(folder, model_dir)
            say("adapter verified: peft loads it on the base model")
            question, answer = _ask(http, final["fine_tuned_model"], proc)
            say(f"asked {final['fine_tuned_model']}: {question}")
            print(f"answer: {answer}", flush=True)
    except Exception as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        _stop(proc)
    print(folder.resolve())
    return 0


def _ask(
    http: httpx.Client, model: str, proc: subprocess.Popen[bytes], timeout: float = 180
) -> tuple[str, str]:
    """Ask ``model`` the first question of the sample (greedy) through the API; the inference
    server ``lorafleet up`` started may still be loading, so 503 is retried until ``timeout``."""
    with open(SAMPLE, encoding="utf-8") as stream:
        messages = json.loads(stream.readline())["messages"]
    prompt = [m for m in messages if m["role"] != "assistant"]
    body = {"model": model, "messages": prompt, "temperature": 0, "max_tokens": 32}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lorafleet up exited with {proc.returncode}")
        response = http.post("/v1/chat/completions", json=body)
        if response.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/chat/completions: {response.status_code} {response.text}")
    answer = response.json()["choices"][0]["message"]["content"]
    return prompt[-1]["content"], answer


def _check_adapter(folder: Path, model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.training.manifest import verify_manifest

    bad = verify_manifest(folder)
    if bad:
        raise RuntimeError(f"manifest checksum mismatch: {bad}")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    PeftModel.from_pretrained(base, str(folder))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
