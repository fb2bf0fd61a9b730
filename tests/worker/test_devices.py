"""The engine's own kernels on every device this machine has (CPU always; CUDA when present, in
fp32 and bf16): segment attention against transformers' masked SDPA, and the fused dropout.

On a GPU machine ``make test`` runs the CUDA cases; here they are skipped and the CPU cases
exercise the same test code. With ``LORAFLEET_REQUIRE_CUDA=1`` (bench/gpu_check.sh sets it) the
CUDA cases never skip: a GPU machine whose CUDA does not work fails them.

"As the engine uses it": on a GPU the engine loads the base in bf16, keeps LoRA in fp32 and runs
under bf16 autocast with the fused LoRA inputs; the ``*-engine`` cases do exactly that.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.spec import LoraSettings
from worker.training import attention
from worker.training.data import IGNORE_INDEX
from worker.training.lora_dropout import DropoutLoraA, fuse_lora_dropout, keep_mask
from worker.training.model import CausalLMLoss, apply_lora, load_base_model

REQUIRE_CUDA = os.environ.get("LORAFLEET_REQUIRE_CUDA") == "1"
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available() and not REQUIRE_CUDA, reason="no CUDA device"
)
CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=CUDA),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def test_cuda_works_when_required() -> None:
    if not REQUIRE_CUDA:
        pytest.skip("LORAFLEET_REQUIRE_CUDA is not set")
    assert torch.cuda.is_available(), "LORAFLEET_REQUIRE_CUDA=1 but torch sees no CUDA device"
    assert torch.cuda.is_bf16_supported(including_emulation=False) or torch.cuda.device_count()


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu-engine"), pytest.param("cuda", id="cuda-engine", marks=CUDA)],
)
def test_engine_autocast_bf16_base_fp32_lora(tiny_model: Path, device: str) -> None:
    """bf16 base, fp32 adapters, fused inputs, bf16 autocast, segment attention: the loss and
    LoRA gradients stay close to an all-fp32 run, and the dtypes are what the engine promises."""
    results = {}
    for half in (False, True):
        base = load_base_model(str(tiny_model), dtype=torch.bfloat16 if half else torch.float32)
        assert attention.use_packed_attention(base, 64)
        torch.manual_seed(0)
        model = apply_lora(
            base, LoraSettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
        )
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.3)
        fuse_lora_dropout(model)
        model.to(device)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        loss_fn = CausalLMLoss(model)
        positions = [[p for n in (20, 9, 13) for p in range(n)] + list(range(6))]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 200, (1, 48), generator=gen).to(device)
        targets = torch.randint(3, 200, (1, 48), generator=gen).to(device)
        layout = attention.build_layout(positions, torch.device(device))
        position_ids = torch.tensor(positions, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=half):
            total, count = loss_fn(ids, targets, position_ids=position_ids, layout=layout)
        total.backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(
            p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None
        )
        results[half] = (float(total.detach()) / int(count), grads)
    (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
    assert abs(loss - ref_loss) <= 3e-2 * max(1.0, abs(ref_loss))
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max()) + 1e-12
        assert float((grad - ref_grads[name]).abs().max()) / scale <= 0.3, name


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
    targets[0, 42:] = IGNORE_INDEX
    targets[1, 36:] = IGNORE_INDEX
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
