"""The gathered mixed-adapter LoRA path (worker/inference/mixed_lora.py) against peft's own
mixed-batch forward (``adapter_names=``): the same output from every LoRA layer and the same
logits, for a batch mixing adapters of different ranks, scalings and target modules with rows on
the bare base, on a Llama-style model (``nn.Linear``) and a GPT-2 one (``Conv1D``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from worker.inference.mixed_lora import BASE, RoutedLayer, Router, install

# Three adapters: ranks 4, 8 and 2 (padded to 8 in the stacks), three scalings, targets that
# overlap only in part, so some layers carry one adapter's rows on zero slots.
LLAMA = {
    "a1": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a2": LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]
    ),
    "a3": LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "gate_proj"]),
}
GPT2 = {
    "a1": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "a2": LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "a3": LoraConfig(r=2, lora_alpha=3, target_modules=["c_fc"], fan_in_fan_out=True),
}
NAMES = ["a1", BASE, "a2", "a3", "a1", "a3", BASE, "a2"]


def mixed_model(base: Path, configs: dict[str, LoraConfig]) -> Any:
    """The base with the three adapters attached, random non-zero LoRA weights."""
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model: Any = None
    for name, config in configs.items():
        config.init_lora_weights = False
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


def layer_outputs(model: Any, ids: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Every LoRA layer's output and the logits of one forward."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach().clone())
        )
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    try:
        with torch.no_grad():
            outputs["logits"] = model(input_ids=ids, **kwargs).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize(("fixture", "configs"), [("tiny_model", LLAMA), ("gpt2_model", GPT2)])
def test_gathered_layers_equal_peft_mixed_batch(
    fixture: str, configs: dict[str, LoraConfig], request: pytest.FixtureRequest
) -> None:
    model = mixed_model(request.getfixturevalue(fixture), configs)
    ids = torch.randint(3, 200, (len(NAMES), 7), generator=torch.Generator().manual_seed(1))
    want = layer_outputs(model, ids, adapter_names=NAMES)

    router = Router()
    install(model, router)
    router.mixed(NAMES, torch.device("cpu"))
    got = layer_outputs(model, ids)

    routed = [m.forward for m in model.modules() if isinstance(m, LoraLayer)]
    assert routed and all(isinstance(r, RoutedLayer) for r in routed)
    # Every layer took the gathered path (a stack, not peft's mixed path as a fallback).
    assert all(r.stack is not None for r in routed)
    assert {len(r.router.adapters) for r in routed} == {3}
    assert got.keys() == want.keys() and len(want) > 1
    for name, expected in want.items():
        torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-5, msg=name)

    # The rows' adapters matter: swapping two rows' adapters changes the answers.
    router.mixed([NAMES[2], *NAMES[1:2], NAMES[0], *NAMES[3:]], torch.device("cpu"))
    swapped = layer_outputs(model, ids)
    assert not torch.allclose(swapped["logits"][0], want["logits"][0], atol=1e-3)
    torch.testing.assert_close(swapped["logits"][1], want["logits"][1], atol=1e-5, rtol=1e-5)

    # One adapter for every row: peft's ordinary forward, untouched.
    router.single()
    model.set_adapter("a2")
    plain = layer_outputs(model, ids)
    reference = layer_outputs(model, ids, adapter_names=["a2"] * len(NAMES))
    torch.testing.assert_close(plain["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
