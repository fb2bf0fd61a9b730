"""SFT, then DPO from its adapter, over real processes: uvicorn API, Celery worker, the stock
``openai`` SDK for the DPO job (``method={"type": "dpo", ...}``).

The preference data follow a rule the model can learn: the chosen answer opens politely, the
rejected one does not, both about the same box. Held-out pairs (other boxes) measure whether the
preference generalises: their reward accuracy must end well above chance and the DPO loss
under log 2.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path
from typing import Any

from openai import OpenAI
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.e2e.live import chat_rows, deployment, job_body, upload, wait_final, wait_for

WORDS = ["red", "blue", "green", "small", "large", "fast", "slow", "warm", "cold", "new", "old"]


def polite_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = " ".join(rng.sample(WORDS, 2))
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"Describe the {thing} box."}]},
                "preferred_output": [
                    {"role": "assistant", "content": f"Sure, happy to help: the box is {thing}."}
                ],
                "non_preferred_output": [
                    {"role": "assistant", "content": f"No. The box is {thing}."}
                ],
            }
        )
    return rows


def _tarball(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {
            m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_sft_then_dpo_through_the_openai_sdk(tiny_dir: Path, tmp_path: Path) -> None:
    with deployment(tmp_path, {"tiny": tiny_dir}) as dep:
        dep.key = dep.create_key("alice")
        dep.start_api()
        dep.start_worker()
        sdk = OpenAI(base_url=f"{dep.url}/v1", api_key=dep.key, max_retries=0)
        with dep.client() as http:
            sft_body = job_body(upload(http, chat_rows(16)), max_steps=4, checkpoint_every_steps=2)
            sft = http.post("/jobs", json=sft_body).json()
            assert wait_final(http, sft["id"])["status"] == "succeeded"
            # "Continue training" for SFT too, here from one of its checkpoints by name.
            checkpoint = sdk.fine_tuning.jobs.checkpoints.list(sft["id"]).data[-1]
            assert checkpoint.step_number == 2
            more = dict(sft_body, training={**sft_body["training"], "max_steps": 2})
            more["training"]["init_adapter"] = checkpoint.fine_tuned_model_checkpoint
            more["training"].pop("checkpoint_every_steps")
            continued = http.post("/jobs", json=more)
            assert continued.status_code == 201, continued.text

            def pairs_file(rows: list[dict[str, Any]], purpose: str) -> str:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                created = sdk.files.create(file=("pairs.jsonl", data), purpose=purpose)  # type: ignore[arg-type]
                assert http.get(f"/files/{created.id}").json()["format"] == "preference"
                return created.id

            train = pairs_file(polite_pairs(48, seed=0), "fine-tune")
            valid = pairs_file(polite_pairs(12, seed=99), "validation")
            dpo = sdk.fine_tuning.jobs.create(
                model="tiny",
                training_file=train,
                validation_file=valid,
                method={
                    "type": "dpo",
                    "dpo": {
                        "hyperparameters": {
                            "beta": 0.1,
                            "batch_size": 4,
                            "learning_rate_multiplier": 25,
                        }
                    },
                },
                extra_body={
                    "lora": sft_body["lora"],
                    "training": {
                        "max_steps": 24,
                        "max_seq_length": 128,
                        "warmup_ratio": 0.0,
                        "eval_every_steps": 4,
                        "init_adapter": sft["id"],
                    },
                },
            )
            assert dpo.method.type == "dpo" and dpo.method.dpo is not None
            assert dpo.method.dpo.hyperparameters.beta == 0.1  # type: ignore[union-attr]

            def finished() -> Any:
                job = sdk.fine_tuning.jobs.retrieve(dpo.id)
                return job if job.status in ("succeeded", "failed", "cancelled") else None

            done = wait_for(finished, 400, 1.0, "the DPO job")
            assert done.status == "succeeded", http.get(f"/jobs/{dpo.id}").json()

            metrics = http.get(f"/jobs/{dpo.id}/metrics").json()["data"]
            assert [m["step"] for m in metrics] == list(range(1, 25))
            evals = [m for m in metrics if m["eval_loss"] is not None]
            assert [m["step"] for m in evals] == [4, 8, 12, 16, 20, 24]
            first, last = evals[0], evals[-1]
            print("eval (step, loss, reward accuracy, margin):")  # shown with -s
            for m in evals:
                print(m["step"], m["eval_loss"], m["eval_reward_accuracy"], m["eval_reward_margin"])
            # Held-out pairs: the preference generalises, and it grew while training.
            assert last["eval_reward_accuracy"] >= 0.9, evals
            assert last["eval_loss"] < math.log(2) - 0.05, evals
            assert last["eval_reward_margin"] > first["eval_reward_margin"] > 0, evals
            assert all(m["reward_accuracy"] is not None for m in metrics)
            progress = http.get(f"/jobs/{dpo.id}/progress").json()
            assert progress["eval_reward_accuracy"] == last["eval_reward_accuracy"]
            events = list(sdk.fine_tuning.jobs.list_events(dpo.id, limit=100))
            step_events = [e for e in events if e.type == "metrics"]
            assert step_events and "valid_reward_accuracy" in (step_events[0].data or {})
            assert any("starting from the adapter of" in e.message for e in events)
            assert any("DPO reference: the starting adapter of" in e.message for e in events)

            download = http.get(f"/jobs/{dpo.id}/adapter")
            assert download.status_code == 200
            files = _tarball(download.content)
            sft_files = _tarball(http.get(f"/jobs/{sft['id']}/adapter").content)
            assert wait_final(http, continued.json()["id"])["status"] == "succeeded"
            assert http.get(f"/jobs/{continued.json()['id']}").json()["progress"]["step"] == 2
            continued_manifest = json.loads(
                _tarball(http.get(f"/jobs/{continued.json()['id']}/adapter").content)[
                    "manifest.json"
                ]
            )
    assert continued_manifest["init_adapter"]["job"] == sft["id"]
    assert continued_manifest["init_adapter"]["step"] == 2
    manifest = json.loads(files["manifest.json"])
    sft_manifest = json.loads(sft_files["manifest.json"])
    assert manifest["method"]["type"] == "dpo"
    assert manifest["dpo_reference"] == "init_adapter"  # the SFT adapter is the reference
    assert manifest["init_adapter"]["job"] == sft["id"]
    assert (
        manifest["init_adapter"]["adapter_sha256"]
        == sft_manifest["files"]["adapter_model.safetensors"]
    )
    folder = tmp_path / "dpo-adapter"
    folder.mkdir()
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(folder))
