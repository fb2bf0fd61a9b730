"""Mixed-adapter LoRA for a decoding batch: one gathered pair of batched matmuls per layer.

peft's mixed batch (``adapter_names=``, ``_mixed_batch_forward``) loops, in every LoRA layer, over
the batch's distinct adapters: select the adapter's rows, two small matmuls, add them back. Its
Python work and kernel launches grow with the number of adapters in the batch, and at decode time
(one token a row) they cost more than the arithmetic. Here, as punica/S-LoRA's BGMV and vLLM's LoRA
kernels do, each layer stacks the A and B weights of the batch's adapters once per batch
composition (slot 0 all zeros, for rows on the bare base; zeros too for an adapter that does not
target the layer; ranks padded to the largest with zeros, which add nothing), and each forward
gathers every row's A and B by its slot and applies them with two ``bmm``, then the row's scaling,
in the order peft computes ``lora_B(lora_A(x)) * scaling``.

What it leaves to peft: batches whose rows all use one adapter (peft's ordinary forward, exactly
what ``PeftModel.generate`` runs), and, per layer, anything but a plain LoRA ``Linear`` (GPT-2's
``Conv1D`` included: its LoRA A and B are ``nn.Linear`` all the same) with vanilla adapters (no
DoRA or other variant, no LoRA bias): those layers take peft's mixed path. Dropout is the identity
at inference (the engine's models are in eval mode), so it is skipped. The stacks live only while
their batch composition does, so they cost the memory of the batch's adapters, not of every
attached one.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class Router:
    """Which adapter each row of the next forward uses, shared by a model's routed layers.

    ``names`` None: every row uses peft's active adapter (its ordinary forward). Otherwise
    ``adapters`` are the batch's distinct adapters (slot ``i + 1``) and ``slots`` gives each row's
    slot (0 for the bare base), on the model's device.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.adapters: tuple[str, ...] = ()
        self.slots: torch.Tensor | None = None
        self.version = 0  # changes whenever the stacks must be rebuilt

    def single(self) -> None:
        self.names = None

    def mixed(self, names: list[str], device: torch.device) -> None:
        if names == self.names:
            return
        adapters = tuple(dict.fromkeys(n for n in names if n != BASE))
        if adapters != self.adapters:
            self.adapters = adapters
            self.version += 1
        slot = {name: i + 1 for i, name in enumerate(adapters)}
        self.slots = torch.tensor([slot.get(n, 0) for n in names], dtype=torch.long, device=device)
        self.names = list(names)

    def invalidate(self) -> None:
        """Adapters were attached or deleted: rebuild the stacks at the next mixed forward."""
        self.version += 1


_NONE = (torch.empty(0), torch.empty(0), torch.empty(0))  # no batch adapter targets the layer


class RoutedLayer:
    """Installed as a LoRA layer's ``forward`` (an instance attribute, so peft's own forward is
    still the class's): peft's forward for one-adapter batches, the gathered path for mixed ones."""

    def __init__(self, layer: LoraLayer, router: Router) -> None:
        assert isinstance(layer, torch.nn.Module)
        self.layer: Any = layer
        self.router = router
        self.peft_forward = type(layer).forward.__get__(layer)
        self.gatherable = type(layer) is LoraLinear
        self.version = -1
        self.stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        router = self.router
        if router.names is None:
            return self.peft_forward(x, *args, **kwargs)  # type: ignore[no-any-return]
        if self.version != router.version:
            self.stack = self._build(router.adapters)
            self.version = router.version
        if self.stack is None or x.shape[0] != len(router.names):
            # Not a plain LoRA Linear (or not one row per name, which peft reports): peft's path.
            return self.peft_forward(x, *args, adapter_names=router.names, **kwargs)  # type: ignore[no-any-return]
        result: torch.Tensor = self.layer.base_layer(x, *args, **kwargs)
        a, b, scale = self.stack
        if a.numel() == 0:
            return result
        assert router.slots is not None
        slots = router.slots
        h = torch.bmm(x.reshape(len(slots), -1, x.shape[-1]).to(a.dtype), a.index_select(0, slots))
        delta = torch.bmm(h, b.index_select(0, slots)) * scale.index_select(0, slots)
        return result + delta.reshape(result.shape).to(result.dtype)

    def _build(
        self, adapters: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The layer's stacks for ``adapters``: A^T [slots, in, r], B^T [slots, r, out], scaling
        [slots, 1, 1]; None when peft's mixed path must run instead."""
        layer = self.layer
        if not self.gatherable:
            return None
        mine = [name for name in adapters if name in layer.lora_A]
        if not mine:
            return _NONE
        for name in mine:
            vanilla = name not in layer.lora_variant and not layer.use_dora.get(name, False)
            if not vanilla or layer.lora_B[name].bias is not None:
                return None
        weights = [(layer.lora_A[name].weight, layer.lora_B[name].weight) for name in mine]
        dtype = weights[0][0].dtype
        if any(a.dtype != dtype or b.dtype != dtype for a, b in weights):
            return None
        rank = max(a.shape[0] for a, _ in weights)
        fan_in, fan_out = weights[0][0].shape[1], weights[0][1].shape[0]
        device = weights[0][0].device
        a_stack = torch.zeros((len(adapters) + 1, fan_in, rank), dtype=dtype, device=device)
        b_stack = torch.zeros((len(adapters) + 1, rank, fan_out), dtype=dtype, device=device)
        scale = torch.zeros((len(adapters) + 1, 1, 1), dtype=dtype, device=device)
        for slot, name in enumerate(adapters, start=1):
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a_stack[slot, :, : a.shape[0]] = a.detach().T
            b_stack[slot, : b.shape[1], :] = b.detach().T
            scale[slot] = layer.scaling[name]
        return a_stack, b_stack, scale


def install(model: torch.nn.Module, router: Router) -> None:
    """Route every LoRA layer of ``model`` that is not routed yet (an adapter with other target
    modules than the ones before creates new layers)."""
    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(
            module.__dict__.get("forward"), RoutedLayer
        ):
            module.__dict__["forward"] = RoutedLayer(module, router)
