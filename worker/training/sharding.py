"""FSDP2 for the engine: the model built empty, sharded layer by layer, filled from rank 0; LoRA
and optimizer state gathered whole for checkpoints and sharded again on resume.

How the base weights arrive (``empty_model`` + ``fill_from_rank0``): every rank builds the model
with its parameters on the meta device (no memory), shards it (``shard_model``), allocates only
its own shards (``to_empty``), and rank 0, the only rank that reads the weights, broadcasts them
tensor by tensor; each rank keeps its slice (``set_model_state_dict(broadcast_from_rank0=True)``,
torch's own path). The alternative, every rank loading the whole model and sharding right after,
is simpler but needs the whole model in host RAM once per rank at the same time: 8 GPUs x a 70B
bf16 model is 1.1 TB on one host. Here the host holds it once (rank 0's copy, dropped before the
first step), and a device never holds more than its shards plus one tensor in flight. Rank 0 also
builds the adapters on its real copy, with the job's seed, so their initial values are those a
single process would draw; the ranks' copies are rank 0's by construction.

What is sharded: each decoder layer (its frozen base and its adapters together: the adapters stay
fp32 and trainable, the base in the load dtype; FSDP2 gathers mixed dtypes as bytes), the input
embedding when it is not tied to the head, and the rest (the LM head, the final norm) as the root,
which FSDP2 keeps gathered from the forward to the end of the backward. The head must not be a
unit of its own: the fused loss calls it once per chunk of target tokens, a number that differs
between ranks, and every call of an FSDP unit is a collective.

Checkpoints hold whole tensors (``gather_full``), the same files as DDP's, so a checkpoint resumes
under either strategy and any world size; ``shard_like`` cuts a whole tensor into this rank's
shard again. Gradients are averaged over ranks by the reduce-scatter, as DDP averages its
all-reduce, so the engine's loss scaling is the same for both (pytorch#162338, a gloo release that
summed instead, is what the engine's equivalence tests guard against).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from peft.utils.integrations import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


def empty_model(path: str, dtype: torch.dtype) -> PreTrainedModel:
    """The base model's modules with parameters on the meta device and real buffers (rotary
    frequencies are computed from the config, not loaded, so they are made here for real)."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return cast(PreTrainedModel, model)


def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D mesh over the job's ranks, on the device type the ranks train on: explicit on CPU,
    where FSDP2 would otherwise look for an accelerator."""
    return init_device_mesh(device.type, (world_size,))


def decoder_layers(causal_lm: PreTrainedModel) -> list[nn.Module]:
    """The repeated blocks, found by transformers' own list of modules never to split."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(causal_lm).__name__} names no decoder layer class (_no_split_modules): "
            "cannot shard it; use training.strategy ddp"
        )
    return layers


def shard_model(root: nn.Module, causal_lm: PreTrainedModel, mesh: DeviceMesh) -> None:
    """``fully_shard`` bottom up: each decoder layer, the untied input embedding, then ``root``
    (the module whose forward the training step calls) with what is left."""
    for layer in decoder_layers(causal_lm):
        fully_shard(layer, mesh=mesh)
    embedding = causal_lm.get_input_embeddings()
    head = causal_lm.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    if not tied:
        fully_shard(embedding, mesh=mesh)
    fully_shard(root, mesh=mesh)


def fill_from_rank0(
    model: nn.Module,
    root: nn.Module,
    source_state: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> None:
    """Allocate this rank's shards of ``root`` on ``device`` and fill ``model`` (a module under
    ``root``) from ``source_state``, rank 0's whole state dict (None on the other ranks)."""
    buffers = {name: buffer.detach().clone() for name, buffer in root.named_buffers()}
    root.to_empty(device=device)  # allocates shards (params) and buffers, uninitialised
    with torch.no_grad():
        for name, buffer in root.named_buffers():
            buffer.copy_(buffers[name])
    state: dict[str, Any] = dict(source_state or {})
    set_model_state_dict(
        model,
        state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def gather_full(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors. Every rank must call it, in the same
    order: gathering a shard is a collective."""
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)
        for name, t in tensors
    }


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as ``like`` holds it: this rank's shard when ``like`` is sharded, else whole, on
    ``like``'s device and in its dtype. Every rank holds the same ``full`` (the same checkpoint
    file), so each cuts its own shard with no communication."""
    if isinstance(like, DTensor):
        local = full.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
    return full.to(device=like.device, dtype=like.dtype)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors (the file a DDP run writes)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: gather_full(sorted(values.items())) for index, values in state["state"].items()
    }
    return state


def sharded_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A whole optimizer state (``full_optimizer_state``) cut to the optimizer's own parameters'
    shards, ready for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {**state}
    state["state"] = {
        index: {
            key: shard_like(value, params[int(index)])
            if value.shape == params[int(index)].shape
            else value  # AdamW's step count: a scalar, the same on every rank
            for key, value in values.items()
        }
        for index, values in state["state"].items()
    }
    return state
