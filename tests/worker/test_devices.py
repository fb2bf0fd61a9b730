"""The engine's own kernels on every device this machine has (CPU always; CUDA when present, in
fp32 and bf16): segment attention against transformers' masked SDPA, and the fused dropout.

On a GPU machine ``make test`` runs the CUDA cases; here they are skipped and the CPU cases
exercise the same test code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.spec import LoraSettings
from worker.training import attention
from worker.training.lora_dropout import DropoutLoraA, keep_mask
from worker.training.model import CausalLMLoss, apply_lora, load_base_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=CUDA),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _loss_and_grads(
    model_dir: Path, device: str, dtype: torch.dtype, segments: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    base = load_base_model(str(model_dir), dtype=dtype)
    if segments:
        assert attention.use_packed_attention(base, 64)
    torch.manual_seed(0)
    model = apply_lora(base, LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    model.to(device)
    loss_fn = CausalLMLoss(model)
    if segments:
        assert loss_fn.segment_attention_error() is None
    docs = [[20, 9, 13], [31, 5]]
    positions = [[p for n in row for p in range(n)] for row in docs]
    width = 48
    positions = [p + list(range(width - len(p))) for p in positions]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, width), generator=gen).to(device)
    targets = torch.randint(3, 200, (2, width), generator=gen)
    targets[0, 42:] = -100
    targets[1, 36:] = -100
    kwargs: dict = {"position_ids": torch.tensor(positions, device=device)}
    if segments:
        kwargs["layout"] = attention.build_layout(positions, torch.device(device))
    total, count = loss_fn(ids, targets.to(device), **kwargs)
    total.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()) / int(count), grads


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_segment_attention_on_device(tiny_model: Path, device: str, dtype: torch.dtype) -> None:
    ref_loss, ref_grads = _loss_and_grads(tiny_model, device, dtype, segments=False)
    loss, grads = _loss_and_grads(tiny_model, device, dtype, segments=True)
    tol = TOLERANCE[dtype]
    assert abs(loss - ref_loss) <= tol * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max()) + 1e-12
        assert float((grad - ref_grads[name]).abs().max()) / scale <= tol * 10, name


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_fused_dropout_on_device(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1_000_000]), 0.1, torch.device(device))
    assert mask.device.type == device
    assert abs(float(mask.float().mean()) - 0.9) < 0.003
    layer = DropoutLoraA(32, 4, bias=False).to(device)
    layer.dropout_p = 0.1
    x = torch.randn(3, 7, 32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert layer.weight.grad.dtype == torch.float32
    # dropped inputs get no gradient
    assert 0 < int((x.grad == 0).sum()) < x.numel()
