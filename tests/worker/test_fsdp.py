"""FSDP2 (``training.strategy: fsdp``) through real gloo ranks on CPU: the same adapter as one
process and as DDP, step-exact resume, checkpoints in the same whole-tensor format as DDP's.

Tolerance: 1e-5 absolute on every adapter weight between one process and two ranks (the sums of
a step are split differently, fp32: about 2e-7 seen), 1e-6 between DDP and FSDP ranks and between
a resumed and an uninterrupted run (0.0 seen: the same ranks do the same arithmetic). A gloo
release that summed FSDP gradients instead of averaging them (pytorch#162338) would double the
gradient norm each step reports (compared at 1e-4 relative): AdamW's update hardly changes with
the gradient's scale, so the adapter alone might not show it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.spec import JobSpec
from tests.worker.conftest import write_jsonl, write_tiny_qwen2
from tests.worker.test_engine import adapter_weights, make_spec, max_diff, run_inprocess
from worker.tiny_models import sample_chat_rows
from worker.training.events import ListSink, Step
from worker.training.launch import launch


def run_ranks(
    spec: JobSpec, nproc: int, folder: Path, resume: Path | None = None
) -> tuple[dict, Path]:
    """Train through launch.py's real ranks; (manifest, rank 0's log)."""
    folder.mkdir(parents=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    work = folder / "work"
    group = launch(
        spec_path,
        folder / "out",
        nproc,
        work_dir=work,
        checkpoint_dir=folder / "checkpoints",
        resume_from=resume,
        cache_dir=folder.parent / "cache",
    )
    assert group.wait() == 0, group.log_tail(4000)
    return json.loads((folder / "out" / "manifest.json").read_text()), work / "rank0.log"


def records(log: Path, kind: str) -> list[dict]:
    """Rank 0's progress records of one type (its log holds them among other output)."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and f'"type": "{kind}"' in line:
            found.append(json.loads(line))
    return found


def with_training(spec: JobSpec, **changes: object) -> JobSpec:
    return spec.model_copy(update={"training": spec.training.model_copy(update=changes)})


def test_two_fsdp_ranks_equal_one_process_and_ddp(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """One whole epoch whose last step leaves rank 1 an empty micro-batch, gradient
    accumulation, packing with segment attention and the fused loss, and a validation set that
    splits unevenly over the ranks (3 + 2 rows in batches of 2: FSDP ranks must still run as many
    forwards): 1 process x 4 rows == 2 DDP ranks x 2 == 2 FSDP ranks x 2."""
    validation = write_jsonl(tmp_path / "val.jsonl", sample_chat_rows(5, seed=3))
    spec = make_spec(
        tiny_model,
        chat_file,
        max_steps=None,
        epochs=1,
        gradient_accumulation_steps=2,
    ).model_copy(update={"validation_file": str(validation)})
    sink = ListSink()
    one, _ = run_inprocess(with_training(spec, batch_size=4), tmp_path / "one" / "out", sink=sink)
    ddp, _ = run_ranks(with_training(spec, strategy="ddp"), 2, tmp_path / "ddp")
    fsdp, log = run_ranks(with_training(spec, strategy="fsdp"), 2, tmp_path / "fsdp")

    assert (one["strategy"], ddp["strategy"], fsdp["strategy"]) == ("ddp", "ddp", "fsdp")
    assert fsdp["world_size"] == 2 and fsdp["effective_batch"] == one["effective_batch"] == 8
    assert fsdp["steps"] == 6  # 45 packed rows / 8: the last step holds 5 rows
    started = records(log, "started")
    assert started and started[0]["strategy"] == "fsdp" and started[0]["world_size"] == 2
    announced = [e for e in records(log, "event") if (e["data"] or {}).get("total_steps")]
    assert announced[0]["data"]["attention"] == "segments"

    # Adam hardly sees a gradient's scale (clipping aside): the norm before clipping does.
    norms = [r["grad_norm"] for r in records(log, "step")]
    expected = [r.grad_norm for r in sink.of(Step)]
    assert len(norms) == len(expected) == 6
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(norms, expected, strict=True))

    weights = {name: adapter_weights(tmp_path / name / "out") for name in ("one", "ddp", "fsdp")}
    assert max_diff(weights["one"], weights["fsdp"]) < 1e-5
    assert max_diff(weights["ddp"], weights["fsdp"]) < 1e-6
    assert abs(one["final_eval_loss"] - fsdp["final_eval_loss"]) < 1e-5
    assert fsdp["trained_tokens"] == one["trained_tokens"]

    # The final adapter is a plain peft folder, written once, that peft loads as it is.
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(tmp_path / "fsdp" / "out")
    )
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == weights["fsdp"].keys()
    assert max(float((state[k] - weights["fsdp"][k]).abs().max()) for k in state) == 0.0


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A Qwen2-style model: the head is the input embedding (one FSDP unit must hold both)."""
    folder = write_tiny_qwen2(tmp_path_factory.mktemp("models") / "qwen2")
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(folder))
    return folder


def test_fsdp_resume_is_step_exact_and_checkpoints_like_ddp(
    tied_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """On a tied-head model with LoRA dropout and gradient checkpointing: FSDP == DDP (the same
    dropout masks per rank), FSDP's checkpoint holds the same whole tensors as DDP's (adapter
    and optimizer state), and an FSDP run resumed from it ends where the uninterrupted run did."""
    spec = make_spec(
        tied_model,
        chat_file,
        max_steps=4,
        checkpoint_every_steps=2,
        gradient_checkpointing=True,
        lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    )
    fsdp_spec = with_training(spec, strategy="fsdp")
    ddp, _ = run_ranks(with_training(spec, strategy="ddp"), 2, tmp_path / "ddp")
    fsdp, _ = run_ranks(fsdp_spec, 2, tmp_path / "fsdp")
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    full = adapter_weights(tmp_path / "fsdp" / "out")
    assert max_diff(adapter_weights(tmp_path / "ddp" / "out"), full) < 1e-6

    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_2"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["strategy"] == "fsdp" and state["step"] == 2
    ddp_checkpoint = tmp_path / "ddp" / "checkpoints" / "step_2"
    assert max_diff(adapter_weights(ddp_checkpoint), adapter_weights(checkpoint)) < 1e-6
    optim = {
        name: torch.load(folder / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
        for name, folder in (("ddp", ddp_checkpoint), ("fsdp", checkpoint))
    }
    assert optim["fsdp"].keys() == optim["ddp"].keys()
    for index, values in optim["fsdp"].items():
        for key, value in values.items():
            assert not hasattr(value, "device_mesh")  # whole tensors, not shards
            assert value.shape == optim["ddp"][index][key].shape
            assert float((value - optim["ddp"][index][key]).abs().max()) < 1e-6

    resumed, log = run_ranks(fsdp_spec, 2, tmp_path / "resumed", resume=checkpoint)
    assert [r["step"] for r in records(log, "resumed")] == [2]
    assert max_diff(full, adapter_weights(tmp_path / "resumed" / "out")) < 1e-6
    assert resumed["trained_tokens"] == fsdp["trained_tokens"]
