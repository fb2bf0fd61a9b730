"""LoRA dropout and the input cast fused into the A projection: peft's maths, a fraction of the
saved bytes.

peft computes ``lora_B(lora_A(dropout(x.to(lora dtype))))``: autograd keeps the dropout mask *and*
the dropped copy of ``x`` for every adapted projection, and q_proj and v_proj each draw their own.
Here ``lora_A`` applies dropout itself and keeps only ``x`` (one tensor, shared by every projection
that reads the same hidden states) and a one-byte mask, rebuilding the dropped input in the
backward with one multiply. The mask comes from 16-bit uniform integers cut out of 64-bit random
words, which on CPU is ~2x cheaper than ``bernoulli_`` and exact to 1/65536 in ``p``.

The cast matters under mixed precision: on a GPU the base weights are bf16 and the LoRA weights
fp32, so peft casts each module's bf16 input to fp32 and autocast casts it back to bf16, a fresh
copy per adapted module that autograd keeps (+4% saved memory for q/v, +12.5% for all-linear on
the tiny model). Fused modules turn peft's cast off (its own ``cast_input_dtype_enabled`` switch)
and cast in ``lora_A`` to the autocast dtype, a no-op for an input already in it: the input stays
shared. Without autocast they cast to the weight dtype, as peft would.

Nothing changes in the adapter: ``lora_A`` keeps its class's parameters and state-dict keys, and
``adapter_config.json`` still records ``lora_dropout``; peft loads and runs it as usual.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

_SPAN = 1 << 16
# random_() on int64 fills bits 0..62: of its four 16-bit fields, the three low ones are uniform.
_UNIFORM_FIELDS = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) booleans; ``p`` is quantised to 1/65536."""
    count = shape.numel()
    words = torch.empty((count + 2) // 3, dtype=torch.int64, device=device).random_()
    fields = words.view(torch.int16).view(-1, 4)[:, _UNIFORM_FIELDS]
    # A uniform signed 16-bit v is below -32768 + t with probability t / 65536: that drops.
    threshold = round(p * _SPAN) - _SPAN // 2
    return (fields >= threshold).reshape(-1)[:count].view(shape)


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float
    ) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = scale
        return F.linear(x.mul(keep).mul_(scale), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).mul_(keep).mul_(ctx.scale)
        if ctx.needs_input_grad[1]:
            dropped = x.mul(keep).mul_(ctx.scale).to(grad.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


class DropoutLoraA(nn.Linear):
    """peft's ``lora_A`` with the adapter's dropout and input cast inside (see the module doc)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.weight.dtype
        x = x.to(dtype)  # no copy when x is already in it: the saved input stays shared
        if not self.training or self.dropout_p == 0.0 or not torch.is_grad_enabled():
            return super().forward(x)
        return _DropoutLinear.apply(  # type: ignore[no-any-return]
            x, self.weight.to(dtype), self.dropout_p
        )


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move each vanilla LoRA Linear's dropout and input cast into its ``lora_A``; returns how many
    modules were fused (all of a module's adapters must be plain LoRA, else it is left alone)."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        names = list(module.lora_A.keys())
        plain = all(
            name not in module.lora_variant
            and type(module.lora_A[name]) in (nn.Linear, DropoutLoraA)
            and module.lora_A[name].bias is None
            and isinstance(module.lora_dropout[name], nn.Dropout | nn.Identity)
            for name in names
        )
        if not names or not plain:
            continue
        for name in names:
            a = module.lora_A[name]
            dropout = module.lora_dropout[name]
            a.__class__ = DropoutLoraA
            if isinstance(dropout, nn.Dropout):
                a.dropout_p = float(dropout.p)  # type: ignore[assignment]
                module.lora_dropout[name] = nn.Identity()
        module.cast_input_dtype_enabled = False
        fused += 1
    return fused
