"""Fused LoRA dropout: peft's maths with the same masks, and the adapter peft expects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shared.spec import LoraSettings
from worker.training.lora_dropout import DropoutLoraA, fuse_lora_dropout, keep_mask
from worker.training.model import apply_lora, load_base_model

QV = ["q_proj", "v_proj"]


@given(st.floats(0.0, 0.9), st.integers(1, 5000))
@settings(max_examples=60, deadline=None)
def test_keep_mask_shape_and_rate(p: float, count: int) -> None:
    torch.manual_seed(count)
    mask = keep_mask(torch.Size([count]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (count,)
    if p == 0.0:
        assert bool(mask.all())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_rate_is_unbiased(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_000
    mask = keep_mask(torch.Size([n]), p, torch.device("cpu")).float()
    # binomial standard deviation is <= 0.00036 here; 5 sigma
    assert abs(float(mask.mean()) - (1 - p)) < 0.0018
    # each of the three 16-bit fields taken from a random word is unbiased too
    for field in mask[: n // 3 * 3].view(-1, 3).mean(dim=0).tolist():
        assert abs(field - (1 - p)) < 0.0036


def test_fused_forward_and_gradients_equal_dropout_then_linear() -> None:
    torch.manual_seed(3)
    a = DropoutLoraA(16, 4, bias=False)
    a.dropout_p = 0.3
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    out = a(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    gx, gw = x.grad.clone(), a.weight.grad.clone()

    torch.manual_seed(7)
    keep = keep_mask(x.shape, 0.3, x.device)
    x.grad = None
    a.weight.grad = None
    ref = nn.functional.linear(x * keep / 0.7, a.weight)
    ref.backward(grad)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(gx, x.grad, atol=1e-6)
    assert torch.allclose(gw, a.weight.grad, atol=1e-6)
    # dropout really drops
    assert 0 < int((~keep).sum()) < keep.numel()


def test_fusing_keeps_keys_eval_outputs_and_skips_p_zero(tiny_model: Path) -> None:
    torch.manual_seed(0)
    model = apply_lora(
        load_base_model(str(tiny_model)), LoraSettings(r=4, dropout=0.1, target_modules=QV)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    keys = list(model.state_dict())
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert fuse_lora_dropout(model) == 2 * model.config.num_hidden_layers  # q_proj and v_proj
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(2)
    assert not torch.allclose(model(input_ids=ids).logits, first)  # training mode drops

    plain = apply_lora(
        load_base_model(str(tiny_model)), LoraSettings(r=4, dropout=0.0, target_modules=QV)
    )
    # without dropout only the input cast moves into lora_A (see the bf16 test below)
    assert fuse_lora_dropout(plain) == 2 * plain.config.num_hidden_layers
    assert all(m.dropout_p == 0.0 for m in plain.modules() if isinstance(m, DropoutLoraA))
