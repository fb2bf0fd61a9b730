"""DPO on a GPT-2-style model (Conv1D ``c_attn``, no chat template, learned positions): the
preference path is not Llama-only. Step 1 starts at log 2 (policy == reference), training moves
the loss, and peft loads the adapter with the fused ``c_attn`` target."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.worker.conftest import write_jsonl
from tests.worker.test_dpo import dpo_spec, polite_pairs, run_inprocess
from worker.training.events import ListSink, Step


def test_dpo_on_gpt2_naming(gpt2_model: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(8, seed=3))
    spec = dpo_spec(gpt2_model, train, max_steps=4, batch_size=4)
    spec = spec.model_copy(
        update={"lora": spec.lora.model_copy(update={"target_modules": ["c_attn"]})}
    )
    sink = ListSink()
    manifest, _ = run_inprocess(spec, tmp_path / "out", sink=sink)
    steps = sink.of(Step)
    assert len(steps) == 4
    assert steps[0].train_loss == pytest.approx(0.69314718, abs=1e-5)
    assert steps[-1].train_loss != pytest.approx(steps[0].train_loss, abs=1e-4)
    assert manifest["lora"]["target_modules"] == ["c_attn"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gpt2_model), tmp_path / "out"
    )
    assert any("c_attn.lora_A" in name for name, _ in model.named_parameters())
