"""The training engine end to end on tiny models: packing isolation, DDP equivalence, resume,
adapters that peft loads, every dataset format. Real torch, transformers and peft; CPU/gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.datasets import load_examples
from shared.spec import JobSpec, LoraSettings
from tests.worker.conftest import write_jsonl, write_tiny_qwen2
from worker.training import data
from worker.training.engine import LoraTrainer, TrainingError, TrainPaths
from worker.training.events import Event, ListSink
from worker.training.launch import launch
from worker.training.manifest import verify_manifest
from worker.training.model import CausalLMLoss, apply_lora, load_base_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def make_spec(model: Path, train: Path, **training: object) -> JobSpec:
    lora = training.pop("lora", {"r": 4, "alpha": 8, "dropout": 0.0})
    body = {
        "base_model": str(model),
        "training_file": str(train),
        "lora": lora,
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "learning_rate": 5e-3,
            "max_seq_length": 128,
            "warmup_ratio": 0.0,
            **training,
        },
    }
    return JobSpec.model_validate(body)


def run_inprocess(
    spec: JobSpec,
    out: Path,
    resume: Path | None = None,
    cache: Path | None = None,
    sink: ListSink | None = None,
) -> tuple[dict, LoraTrainer]:
    trainer = LoraTrainer(
        spec,
        TrainPaths(model=spec.base_model, output_dir=out, resume_from=resume, cache_dir=cache),
        sink=sink,
    )
    trainer.setup()
    manifest = trainer.train()
    trainer.cleanup()
    return manifest, trainer


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def tiny_lora(model: Path, chat_file: Path) -> LoraSettings:
    return make_spec(model, chat_file).lora.model_copy(
        update={"target_modules": ["q_proj", "v_proj"]}
    )


def test_packed_loss_equals_examples_run_one_by_one(tiny_model: Path, chat_file: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    tokenized, _ = data.tokenize_examples(tok, load_examples(str(chat_file))[:6], 128)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(str(tiny_model)), tiny_lora(tiny_model, chat_file))
    # make the adapter non-trivial so attention differences would show
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    loss_fn = CausalLMLoss(model).eval()
    packed = data.pack(tokenized, int(tokenized.lengths.sum()) + 3)
    assert len(packed) == 1
    row = packed[0]
    as_batch = {
        "input_ids": torch.tensor(row.input_ids[None], dtype=torch.long),
        "targets": torch.tensor(row.targets[None], dtype=torch.long),
    }
    alone = data.unpacked_rows(tokenized)
    with torch.no_grad():
        packed_sum, packed_count = loss_fn(
            **as_batch, position_ids=torch.tensor(row.position_ids[None], dtype=torch.long)
        )
        alone_sum, alone_count = 0.0, 0
        for i in range(len(alone)):
            s, c = loss_fn(
                torch.tensor(alone[i].input_ids[None], dtype=torch.long),
                torch.tensor(alone[i].targets[None], dtype=torch.long),
            )
            alone_sum += float(s)
            alone_count += int(c)
        # plain causal attention across the packed documents would give another loss
        leaky_sum, _ = loss_fn(
            **as_batch, attention_mask=torch.ones(1, row.real_tokens, dtype=torch.long)
        )
    assert int(packed_count) == alone_count
    packed_mean = float(packed_sum) / alone_count
    assert abs(packed_mean - alone_sum / alone_count) < 1e-4
    assert abs(float(leaky_sum) / alone_count - packed_mean) > 1e-3


def test_chunked_loss_matches_model_forward(tiny_model: Path, chat_file: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    tokenized, _ = data.tokenize_examples(tok, load_examples(str(chat_file))[:1], 128)
    example = data.unpacked_rows(tokenized)[0]
    model = apply_lora(load_base_model(str(tiny_model)), tiny_lora(tiny_model, chat_file))
    loss_fn = CausalLMLoss(model, chunk_tokens=3).eval()
    ids = torch.tensor(example.input_ids[None], dtype=torch.long)
    with torch.no_grad():
        s, c = loss_fn(ids, torch.tensor(example.targets[None], dtype=torch.long))
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    targets = torch.tensor(example.targets[:-1], dtype=torch.long)
    keep = targets != data.IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert int(c) == int(keep.sum())
    assert abs(float(s) - float(reference)) < 1e-3


def test_adapter_loads_with_peft_and_lowers_loss(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tiny_model,
        chat_file,
        max_steps=30,
        batch_size=4,
        learning_rate=1e-2,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    )
    manifest, trainer = run_inprocess(spec, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert verify_manifest(out) == []
    assert manifest["steps"] == 30 and manifest["world_size"] == 1
    assert manifest["trained_tokens"] > 0 and manifest["dataset_sha256"]

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    trained = trainer.peft_model.eval()
    row = trainer.rows[0]
    ids = torch.tensor(row.input_ids[None], dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(
            loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5
        )
        fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
        targets = torch.tensor(row.targets[None], dtype=torch.long)
        base_loss = CausalLMLoss(apply_lora(fresh, trainer.lora)).eval()(ids, targets)
        tuned_loss = CausalLMLoss(loaded)(ids, targets)
    assert float(tuned_loss[0]) < float(base_loss[0]) * 0.97


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": f"Q{i}: 2+{i}?", "completion": f" {2 + i}"} for i in range(12)],
        [{"instruction": "Add one", "input": str(i), "output": str(i + 1)} for i in range(12)],
        [{"text": f"counting {i} {i + 1} {i + 2}"} for i in range(12)],
    ],
    ids=["completion", "alpaca", "text"],
)
def test_each_dataset_format_trains(tiny_model: Path, tmp_path: Path, rows: list[dict]) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    manifest, _ = run_inprocess(make_spec(tiny_model, train, max_steps=2), tmp_path / "out")
    assert manifest["steps"] == 2 and manifest["final_train_loss"] > 0


def test_gpt2_naming_without_chat_template(
    gpt2_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        gpt2_model,
        chat_file,
        max_steps=2,
        packing=False,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]},
    )
    manifest, _ = run_inprocess(spec, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    assert manifest["parameters"]["trainable"] > 0


def test_epochs_run_whole_when_no_max_steps(tiny_model: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(10)])
    spec = make_spec(tiny_model, train, max_steps=None, epochs=2, packing=False, batch_size=3)
    manifest, _ = run_inprocess(spec, tmp_path / "out")
    assert manifest["steps"] == 2 * 4  # ceil(10 / 3) steps per epoch


def test_adapters_name_the_base_publicly(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    """Checkpoints and the final adapter are served and downloaded: their ``adapter_config.json``
    names the job's base model, never the folder this worker loaded it from."""
    spec = make_spec(tiny_model, chat_file, max_steps=2, checkpoint_every_steps=1)
    spec = spec.model_copy(update={"base_model": "acme/tiny-public"})
    out = tmp_path / "out"
    trainer = LoraTrainer(spec, TrainPaths(model=str(tiny_model), output_dir=out))
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    for folder in (out, out / "checkpoints" / "step_1"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "acme/tiny-public", folder


def test_resume_is_step_exact(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    """Interrupted at step 3 and resumed == uninterrupted, dropout and token count included; the
    resumed attempt reuses the prepared data."""
    spec = make_spec(
        tiny_model,
        chat_file,
        max_steps=6,
        checkpoint_every_steps=3,
        gradient_accumulation_steps=2,
        lora={"r": 4, "alpha": 8, "dropout": 0.1},
    )
    cache = tmp_path / "cache"
    full, trainer = run_inprocess(spec, tmp_path / "full", cache=cache)
    checkpoint = tmp_path / "full" / "checkpoints" / "step_3"
    assert (checkpoint / "trainer_state.pt").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    expected = trainer.plan.tokens_before(6, trainer.rows.real_tokens)
    assert full["trained_tokens"] == expected
    assert state["trained_tokens"] == trainer.plan.tokens_before(3, trainer.rows.real_tokens)
    assert "rng" not in torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    sink = ListSink()
    resumed_manifest, resumed = run_inprocess(
        spec, tmp_path / "resumed", resume=checkpoint, cache=cache, sink=sink
    )
    assert resumed.start_step == 3
    assert resumed_manifest["trained_tokens"] == expected
    assert any(e.data and e.data.get("reused") for e in sink.of(Event))
    diff = max_diff(adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "resumed"))
    assert diff < 1e-6
    # A checkpoint of another seed, or a batch that cannot keep its global batch, is refused.
    other_seed = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 1})})
    with pytest.raises(TrainingError, match="training.seed"):
        run_inprocess(other_seed, tmp_path / "x", resume=checkpoint, cache=cache)
    odd = spec.model_copy(update={"training": spec.training.model_copy(update={"batch_size": 3})})
    with pytest.raises(TrainingError, match="global batch is 4"):
        run_inprocess(odd, tmp_path / "y", resume=checkpoint, cache=cache)


def test_two_processes_equal_one(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    """Same global batch (1x4 vs 2x2) and seed -> the same adapter, through real gloo DDP."""
    outs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        spec = make_spec(tiny_model, chat_file, max_steps=5, batch_size=batch)
        spec_path = tmp_path / f"spec{nproc}.json"
        spec_path.write_text(spec.model_dump_json())
        out = tmp_path / f"out{nproc}"
        group = launch(spec_path, out, nproc, work_dir=tmp_path / f"work{nproc}")
        assert group.wait() == 0, group.log_tail()
        outs[nproc] = out
    manifest = json.loads((outs[2] / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["effective_batch"] == 4
    assert max_diff(adapter_weights(outs[1]), adapter_weights(outs[2])) < 1e-5


def test_cli_train_with_two_processes(tiny_model: Path, tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"hello {i}"},
            ]
        }
        for i in range(16)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = make_spec(tiny_model, train, max_steps=3).model_dump()
    spec["training_file"] = "train.jsonl"  # relative to the spec file
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            str(tmp_path / "spec.json"),
            "--out",
            str(tmp_path / "adapter"),
            "--nproc",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3/3" in result.stderr
    # training.strategy auto: the estimate says a replica of this tiny model fits easily
    assert "training.strategy auto: ddp" in result.stderr
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["strategy"] == "ddp"


def test_cli_train_reports_bad_line(tiny_model: Path, tmp_path: Path) -> None:
    train = tmp_path / "bad.jsonl"
    train.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": 5}\n')
    spec = make_spec(tiny_model, train)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            str(tmp_path / "spec.json"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "line 3" in result.stderr and "'text' must be a string" in result.stderr


def test_qwen2_architecture_with_tied_head_and_no_bos(tmp_path: Path, chat_file: Path) -> None:
    """A Qwen2-style model (tied embeddings, bias on q/k/v, tokenizer without BOS) trains too."""
    from transformers import AutoTokenizer

    from worker.tiny_models import make_tiny

    source = make_tiny(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.bos_token = None
    model_dir = write_tiny_qwen2(tmp_path / "qwen2")
    tokenizer.save_pretrained(str(model_dir))
    spec = make_spec(
        model_dir,
        chat_file,
        max_steps=3,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    )
    manifest, trainer = run_inprocess(spec, tmp_path / "out")
    assert manifest["base_model"]["model_type"] == "qwen2"
    assert trainer.rows[0].input_ids[0] != tokenizer.bos_token_id or tokenizer.bos_token_id is None
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "out")
    )
    assert loaded is not None


def test_gradient_checkpointing_and_bf16_autocast(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """Checkpointing recomputes activations without changing the update; bf16 autocast runs on
    CPU (this machine's avx512_bf16) and stays close to fp32 on a short run."""
    plain, _ = run_inprocess(make_spec(tiny_model, chat_file, max_steps=3), tmp_path / "plain")
    ckpt, _ = run_inprocess(
        make_spec(tiny_model, chat_file, max_steps=3, gradient_checkpointing=True),
        tmp_path / "ckpt",
    )
    bf16, _ = run_inprocess(
        make_spec(tiny_model, chat_file, max_steps=3, precision="bf16"), tmp_path / "bf16"
    )
    a, b = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "ckpt")
    assert max_diff(a, b) < 1e-6
    assert bf16["precision"] == "bfloat16"
    assert abs(bf16["final_train_loss"] - plain["final_train_loss"]) < 0.05


def test_gpt2_default_targets_are_its_attention(
    gpt2_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    """No target_modules in the spec: GPT-2 gets c_attn (not Llama's q_proj/v_proj)."""
    spec = make_spec(gpt2_model, chat_file, max_steps=1)
    assert spec.lora.target_modules is None
    manifest, trainer = run_inprocess(spec, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    assert manifest["lora"]["target_modules"] == ["c_attn"]
    assert trainer.packed_attention
