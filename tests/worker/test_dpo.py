"""DPO in the engine, checked against an independent computation.

The reference implementation here shares no code with the engine: it tokenizes the pairs itself,
runs each sequence alone through plain transformers (policy: peft with the adapter; reference: a
separately loaded base model), takes full-vocabulary logits, and writes out the sigmoid DPO loss.
The engine's gradient of a step is read back from its checkpoints: AdamW's first moment after
steps 1 and 2 gives step 2's gradient exactly, g2 = (m2 - 0.9 m1) / 0.1 (no clipping, no decay).
Step 2 is used, not step 1, because after one step the adapter is non-zero and the reference
(adapter off) differs from the policy, so a reference computed with the adapter on would show.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.spec import JobSpec
from tests.worker.conftest import write_jsonl
from worker.training.engine import (
    REFERENCE_EVAL_FILE,
    REFERENCE_FILE,
    LoraTrainer,
    TrainingError,
    TrainPaths,
)
from worker.training.events import Event, ListSink, Step, parse
from worker.training.launch import launch

BETA = 0.2
LOG_2 = 0.69314718


def polite_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """The chosen answer follows a rule (a polite opening) that the rejected one breaks."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "small", "large", "fast", "slow", "warm", "cold", "new"]
    rows = []
    for _ in range(n):
        thing = " ".join(rng.sample(words, 2))
        rows.append(
            {
                "prompt": f"Describe the {thing} box.",
                "chosen": f" Sure, happy to help: the box is {thing}.",
                "rejected": f" No. The box is {thing}.",
            }
        )
    return rows


def dpo_spec(model: Path, train: Path, **training: Any) -> JobSpec:
    method = training.pop("method", {"type": "dpo", "dpo": {"beta": BETA}})
    body = {
        "base_model": str(model),
        "training_file": str(train),
        "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": 3,
            "batch_size": 8,
            "learning_rate": 2e-2,
            "max_seq_length": 100,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": None,
            "lr_scheduler": "constant",
            "checkpoint_every_steps": 1,
            **training,
        },
    }
    return JobSpec.model_validate(body)


def run_inprocess(
    spec: JobSpec, out: Path, resume: Path | None = None, sink: ListSink | None = None
) -> tuple[dict[str, Any], LoraTrainer]:
    trainer = LoraTrainer(
        spec, TrainPaths(model=spec.base_model, output_dir=out, resume_from=resume), sink=sink
    )
    trainer.setup()
    manifest = trainer.train()
    trainer.cleanup()
    assert manifest is not None
    return manifest, trainer


def train_sft_adapter(model: Path, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A short SFT run (the politeness the pairs prefer): its manifest and adapter folder."""
    chat = [
        {"prompt": f"Describe box {i}.", "completion": f" Sure, happy to help: box {i}."}
        for i in range(8)
    ]
    sft_spec = dpo_spec(
        model,
        write_jsonl(tmp_path / "sft.jsonl", chat),
        method={"type": "supervised"},
        max_steps=3,
        batch_size=4,
        checkpoint_every_steps=None,
    )
    manifest, _ = run_inprocess(sft_spec, tmp_path / "sft")
    return manifest, tmp_path / "sft"


def adapter_weights(model: Path, folder: Path) -> list[torch.Tensor]:
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model)), str(folder)
    )
    return [p.detach().clone() for n, p in adapter.named_parameters() if "lora" in n]


# ------------------------------------------------------------------------ the independent side
def encode(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
    """BOS + prompt + answer + EOS, loss on the answer and its EOS (the documented format)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, *prompt_ids, *answer_ids, tokenizer.eos_token_id]
    trained = [False] * (1 + len(prompt_ids)) + [True] * (len(answer_ids) + 1)
    return ids, trained


def sequence_logp(model: Any, ids: list[int], trained: list[bool]) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
    token_logps = F.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return (token_logps * torch.tensor(trained[1:], dtype=torch.float32)).sum()


def independent_reference(
    model_dir: Path, adapter_dir: Path, rows: list[dict[str, str]]
) -> torch.Tensor:
    """Each pair's (chosen, rejected) summed answer log-probabilities under base + the adapter
    of ``adapter_dir``, loaded with plain peft: ``2 * len(rows)`` values, chosen first."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
        str(adapter_dir),
    )
    model.eval()
    values = []
    with torch.no_grad():
        for row in rows:
            for side in ("chosen", "rejected"):
                values.append(sequence_logp(model, *encode(tokenizer, row["prompt"], row[side])))
    return torch.stack(values).double()


def independent_dpo(
    model_dir: Path, adapter_dir: Path, rows: list[dict[str, str]], beta: float
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Mean DPO loss, rewards and the gradient of the LoRA parameters (in parameter order)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
        str(adapter_dir),
        is_trainable=True,
    )
    policy.train()
    losses, chosen_rewards, rejected_rewards = [], [], []
    for row in rows:
        ratios = []
        for side in ("chosen", "rejected"):
            ids, trained = encode(tokenizer, row["prompt"], row[side])
            with torch.no_grad():
                ref = sequence_logp(reference, ids, trained)
            ratios.append(sequence_logp(policy, ids, trained) - ref)
        losses.append(-F.logsigmoid(beta * (ratios[0] - ratios[1])))
        chosen_rewards.append(beta * ratios[0].detach())
        rejected_rewards.append(beta * ratios[1].detach())
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad]
    chosen, rejected = torch.stack(chosen_rewards), torch.stack(rejected_rewards)
    numbers = {
        "train_loss": float(loss.detach()),
        "rewards_chosen": float(chosen.mean()),
        "rewards_rejected": float(rejected.mean()),
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).mean()),
    }
    return numbers, grads


def engine_gradient(checkpoints: Path, step: int) -> list[torch.Tensor]:
    """The gradient of ``step`` (>= 2) from AdamW's first moments of two checkpoints."""

    def moments(at: int) -> list[torch.Tensor]:
        state = torch.load(checkpoints / f"step_{at}" / "trainer_state.pt", weights_only=False)
        optimizer = state["optimizer"]
        order = optimizer["param_groups"][0]["params"]
        return [optimizer["state"][i]["exp_avg"] for i in order]

    before, after = moments(step - 1), moments(step)
    return [(m2 - 0.9 * m1) / 0.1 for m1, m2 in zip(before, after, strict=True)]


def assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert [g.shape for g in ours] == [g.shape for g in theirs]
    scale = max(float(g.abs().max()) for g in theirs)
    error = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    assert scale > 1e-6 and error <= 2e-3 * scale, (error, scale)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("packing", "nproc", "strategy"),
    [
        (True, 1, "ddp"),
        (False, 1, "ddp"),
        pytest.param(True, 2, "ddp", marks=pytest.mark.slow),
        pytest.param(True, 2, "fsdp", marks=pytest.mark.slow),
    ],
)
def test_dpo_step_equals_independent_computation(
    tiny_plain_model: Path, tmp_path: Path, packing: bool, nproc: int, strategy: str
) -> None:
    """Loss, rewards and gradient of a step, packed (several pairs a row) and unpacked (one pair
    a row), in 1 process and 2 (DDP and FSDP), equal the straightforward computation from full
    logits."""
    rows = polite_pairs(6, seed=1)
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    # One step holds every pair: its pair set is known whatever the shuffle.
    spec = dpo_spec(
        tiny_plain_model, train, packing=packing, batch_size=8 // nproc, strategy=strategy
    )
    out = tmp_path / "out"
    if nproc == 1:
        sink = ListSink()
        _, trainer = run_inprocess(spec, out, sink=sink)
        steps = sink.of(Step)
        assert trainer.rows.pairs and int(trainer.rows.pair_counts.sum()) == len(rows)
        assert (len(trainer.rows) < len(rows)) == packing  # packed rows hold several pairs
    else:
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(spec.model_dump_json())
        progress = tmp_path / "progress.jsonl"
        group = launch(spec_path, out, nproc, work_dir=tmp_path / "work", progress_file=progress)
        assert group.wait() == 0, group.log_tail()
        records = [parse(line) for line in progress.read_text().splitlines()]
        steps = [r for r in records if isinstance(r, Step)]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and manifest["effective_batch"] == 8
        assert manifest["strategy"] == strategy
    first, second = steps[0], steps[1]
    assert first.train_loss == pytest.approx(0.69314718, abs=1e-5)  # policy == reference at 0
    numbers, grads = independent_dpo(tiny_plain_model, out / "checkpoints" / "step_1", rows, BETA)
    for name, value in numbers.items():
        assert getattr(second, name) == pytest.approx(value, abs=2e-4), name
    assert_close(engine_gradient(out / "checkpoints", 2), grads)


def test_precomputed_reference_is_kept_and_resume_is_exact(
    tiny_plain_model: Path, tmp_path: Path
) -> None:
    """dpo.precompute_reference trains like the per-step reference; its table is saved in every
    checkpoint, and a run resumed from one equals the uninterrupted run."""
    rows = polite_pairs(12, seed=2)
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = {"max_steps": 4, "batch_size": 2, "checkpoint_every_steps": 2}
    precompute = {"type": "dpo", "dpo": {"beta": BETA, "precompute_reference": True}}
    spec = dpo_spec(tiny_plain_model, train, method=precompute, **common)
    full, trainer = run_inprocess(spec, tmp_path / "full")
    table = trainer.reference
    assert table is not None and len(table) == 2 * len(rows) and (table < 0).all()
    saved = tmp_path / "full" / "checkpoints" / "step_2" / REFERENCE_FILE
    assert saved.exists()
    sink = ListSink()
    resumed, _ = run_inprocess(spec, tmp_path / "resumed", resume=saved.parent, sink=sink)
    assert any("restored from the checkpoint" in e.message for e in sink.of(Event))
    assert [s.step for s in sink.of(Step)] == [3, 4]
    assert full["final_metrics"] == pytest.approx(resumed["final_metrics"], abs=1e-6)
    weights = {}
    for name in ("full", "resumed"):
        adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(tiny_plain_model)), str(tmp_path / name)
        )
        weights[name] = [p.detach().clone() for n, p in adapter.named_parameters() if "lora" in n]
    assert max(float((a - b).abs().max()) for a, b in zip(*weights.values(), strict=True)) < 1e-6
    on_the_fly, _ = run_inprocess(dpo_spec(tiny_plain_model, train, **common), tmp_path / "fly")
    assert full["final_train_loss"] == pytest.approx(on_the_fly["final_train_loss"], abs=1e-4)
    assert full["method"]["dpo"]["precompute_reference"] is True
    # Two FSDP ranks precompute their shares of the table and train like the one process (the
    # table's batches differ, so its sums round differently: 2e-5 seen after 4 steps at lr 2e-2).
    sharded = spec.model_copy(
        update={"training": spec.training.model_copy(update={"batch_size": 1, "strategy": "fsdp"})}
    )
    (tmp_path / "fsdp.json").write_text(sharded.model_dump_json())
    group = launch(tmp_path / "fsdp.json", tmp_path / "fsdp", 2, work_dir=tmp_path / "work")
    assert group.wait() == 0, group.log_tail()
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_plain_model)), str(tmp_path / "fsdp")
    )
    ranks = [p.detach().clone() for n, p in adapter.named_parameters() if "lora" in n]
    assert (
        max(float((a - b).abs().max()) for a, b in zip(weights["full"], ranks, strict=True)) < 1e-4
    )


def test_method_and_data_must_agree(tiny_plain_model: Path, tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(4, seed=3))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}] * 4)
    with pytest.raises(TrainingError, match="training_file: method.type 'dpo'"):
        run_inprocess(dpo_spec(tiny_plain_model, text), tmp_path / "a")
    supervised = dpo_spec(tiny_plain_model, pairs, method={"type": "supervised"})
    with pytest.raises(TrainingError, match="training_file: holds preference pairs"):
        run_inprocess(supervised, tmp_path / "b")
    with pytest.raises(TrainingError, match="validation_file"):
        spec = dpo_spec(tiny_plain_model, pairs).model_copy(update={"validation_file": str(text)})
        run_inprocess(spec, tmp_path / "c")


def test_sft_then_dpo_starts_from_the_sft_adapter(tiny_plain_model: Path, tmp_path: Path) -> None:
    """training.init_adapter (a local folder here, as with `lorafleet train`): the DPO run
    starts from the SFT adapter's weights, and the manifest records them by sha256."""
    sft, sft_dir = train_sft_adapter(tiny_plain_model, tmp_path)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(4, seed=4))
    frozen = dpo_spec(  # a learning rate too small to move anything: the output is the input
        tiny_plain_model,
        pairs,
        max_steps=1,
        learning_rate=1e-12,
        init_adapter=str(sft_dir),
        checkpoint_every_steps=None,
    )
    sink = ListSink()
    manifest, _ = run_inprocess(frozen, tmp_path / "dpo", sink=sink)
    parent = manifest["init_adapter"]
    assert parent["adapter_sha256"] == sft["files"]["adapter_model.safetensors"]
    assert parent["reference"] == str(sft_dir) and parent["job"] is None
    weights = {name: adapter_weights(tiny_plain_model, tmp_path / name) for name in ("sft", "dpo")}
    assert max(float((a - b).abs().max()) for a, b in zip(*weights.values(), strict=True)) < 1e-6
    assert max(float(w.abs().max()) for w in weights["sft"]) > 1e-3  # SFT moved the adapter
    other = frozen.model_copy(update={"lora": frozen.lora.model_copy(update={"r": 8})})
    with pytest.raises(TrainingError, match="lora.r: 8 differs from the init adapter's 4"):
        run_inprocess(other, tmp_path / "other")


def test_init_adapter_is_the_dpo_reference(tiny_plain_model: Path, tmp_path: Path) -> None:
    """Starting from an SFT adapter, the DPO reference is base + that adapter (not the bare
    base): the tables of the training and the validation pairs, precomputed before the first
    update without being asked, equal plain peft's full-logits log-probabilities, and at step 1
    the policy equals the reference (loss log 2, rewards 0)."""
    _, sft_dir = train_sft_adapter(tiny_plain_model, tmp_path)
    rows, held_out = polite_pairs(6, seed=5), polite_pairs(3, seed=6)
    spec = dpo_spec(
        tiny_plain_model,
        write_jsonl(tmp_path / "pairs.jsonl", rows),
        max_steps=2,
        init_adapter=str(sft_dir),
        eval_every_steps=1,
    ).model_copy(update={"validation_file": str(write_jsonl(tmp_path / "valid.jsonl", held_out))})
    sink = ListSink()
    manifest, trainer = run_inprocess(spec, tmp_path / "dpo", sink=sink)
    assert trainer.reference is not None and trainer.reference_eval is not None
    torch.testing.assert_close(
        torch.from_numpy(trainer.reference),
        independent_reference(tiny_plain_model, sft_dir, rows),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.from_numpy(trainer.reference_eval),
        independent_reference(tiny_plain_model, sft_dir, held_out),
        atol=1e-4,
        rtol=0,
    )
    first = sink.of(Step)[0]
    assert first.train_loss == pytest.approx(LOG_2, abs=1e-5)
    assert first.rewards_chosen == pytest.approx(0.0, abs=1e-5)
    assert first.reward_margin == pytest.approx(0.0, abs=1e-5)
    messages = [e.message for e in sink.of(Event)]
    assert f"DPO reference: the starting adapter of {sft_dir}, precomputed for 18 sequences" in (
        " ".join(messages)
    )
    assert manifest["dpo_reference"] == "init_adapter"
    checkpoint = tmp_path / "dpo" / "checkpoints" / "step_1"
    assert (checkpoint / REFERENCE_FILE).exists() and (checkpoint / REFERENCE_EVAL_FILE).exists()
    assert json.loads((checkpoint / "state.json").read_text())["dpo_reference"] == "init_adapter"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_init_adapter_reference_on_two_ranks(
    tiny_plain_model: Path, tmp_path: Path, strategy: str
) -> None:
    """Two ranks (DDP, and FSDP where only rank 0 reads the starting adapter) precompute their
    shares of both tables with the starting adapter on: the same values, and loss log 2."""
    _, sft_dir = train_sft_adapter(tiny_plain_model, tmp_path)
    rows, held_out = polite_pairs(6, seed=5), polite_pairs(3, seed=6)
    spec = dpo_spec(
        tiny_plain_model,
        write_jsonl(tmp_path / "pairs.jsonl", rows),
        max_steps=2,
        batch_size=4,
        strategy=strategy,
        init_adapter=str(sft_dir),
    ).model_copy(update={"validation_file": str(write_jsonl(tmp_path / "valid.jsonl", held_out))})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    progress = tmp_path / "progress.jsonl"
    out = tmp_path / "out"
    group = launch(
        tmp_path / "spec.json", out, 2, work_dir=tmp_path / "work", progress_file=progress
    )
    assert group.wait() == 0, group.log_tail()
    records = [parse(line) for line in progress.read_text().splitlines()]
    assert [r for r in records if isinstance(r, Step)][0].train_loss == pytest.approx(
        LOG_2, abs=1e-5
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == strategy and manifest["dpo_reference"] == "init_adapter"
    checkpoint = out / "checkpoints" / "step_1"
    for name, data in ((REFERENCE_FILE, rows), (REFERENCE_EVAL_FILE, held_out)):
        torch.testing.assert_close(
            torch.from_numpy(np.load(checkpoint / name)),
            independent_reference(tiny_plain_model, sft_dir, data),
            atol=1e-4,
            rtol=0,
        )


def test_init_adapter_reference_survives_resume(tiny_plain_model: Path, tmp_path: Path) -> None:
    """A job resumed mid-run restores both reference tables from its checkpoint (the adapter
    has moved on: recomputing them would give other values) and equals the uninterrupted run,
    training and evaluation numbers alike; without init_adapter the reference stays the base."""
    _, sft_dir = train_sft_adapter(tiny_plain_model, tmp_path)
    spec = dpo_spec(
        tiny_plain_model,
        write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(8, seed=7)),
        max_steps=4,
        batch_size=2,
        checkpoint_every_steps=2,
        eval_every_steps=2,
        init_adapter=str(sft_dir),
    ).model_copy(
        update={"validation_file": str(write_jsonl(tmp_path / "valid.jsonl", polite_pairs(3, 8)))}
    )
    full, trainer = run_inprocess(spec, tmp_path / "full")
    saved = tmp_path / "full" / "checkpoints" / "step_2"
    sink = ListSink()
    resumed, again = run_inprocess(spec, tmp_path / "resumed", resume=saved, sink=sink)
    assert [s.step for s in sink.of(Step)] == [3, 4]
    assert any("restored from the checkpoint" in e.message for e in sink.of(Event))
    assert trainer.reference is not None and trainer.reference_eval is not None
    assert again.reference is not None and again.reference_eval is not None
    assert (again.reference == trainer.reference).all()
    assert (again.reference_eval == trainer.reference_eval).all()
    assert full["final_metrics"] == pytest.approx(resumed["final_metrics"], abs=1e-6)
    assert full["final_eval_loss"] == pytest.approx(resumed["final_eval_loss"], abs=1e-6)
    ours, theirs = (adapter_weights(tiny_plain_model, tmp_path / n) for n in ("full", "resumed"))
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True)) < 1e-6
    # A checkpoint without the tables cannot be resumed: they cannot be recomputed.
    (saved / REFERENCE_EVAL_FILE).unlink()
    with pytest.raises(TrainingError, match="cannot be recomputed"):
        run_inprocess(spec, tmp_path / "broken", resume=saved)
    # Without init_adapter: the base model, in every step, as before.
    plain = spec.model_copy(
        update={"training": spec.training.model_copy(update={"init_adapter": None})}
    )
    sink = ListSink()
    manifest, base = run_inprocess(plain, tmp_path / "plain", sink=sink)
    assert base.reference is None and base.reference_eval is None
    assert manifest["dpo_reference"] == "base"
    assert sink.of(Step)[0].train_loss == pytest.approx(LOG_2, abs=1e-5)
    assert any(
        "DPO reference: the base model (adapter disabled), computed in every step" in e.message
        for e in sink.of(Event)
    )
