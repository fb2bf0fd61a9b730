"""Memory and size estimate of a LoRA job before it runs (``POST /estimate``); pure Python.

A job that does not fit should be refused at submission, not an hour later as a CUDA OOM on a
worker. Everything here comes from the job body and the model's files (:mod:`shared.modelinfo`),
so the API answers without torch or a GPU. Parameter counts are exact; memory is a model of what
the engine holds on one device at its peak (forward done, backward starting), and errs high.

Formulas (per device; ``P`` total parameters, ``T`` LoRA parameters, ``L`` layers, ``H`` hidden,
``K`` k/v width = kv_heads * head_dim, ``I`` MLP width, ``V`` vocabulary, ``N`` tokens per
micro-step = batch_size * max_seq_length (packing fills rows, so this is also the typical case),
``a`` bytes per activation value (2 in bf16/fp16, 4 in fp32)):

- ``weights``      = P * w, the frozen base at ``w`` bytes (fp32: 4; bf16/fp16: 2, because frozen
                     weights need no fp32 master copy). ``base_weight_bytes`` overrides ``w``.
- ``lora_weights`` = 4T (adapters are kept in fp32 for stable updates), + 2T under bf16/fp16: the
                     half-precision copies of the adapters autocast makes and keeps for backward.
- ``gradients``    = 4T, doubled under DDP (world_size > 1) for the all-reduce buckets.
- ``optimizer``    = 8T (AdamW: exp_avg and exp_avg_sq in fp32).
- ``activations``  = N * a * (L * (8H + 2K + 4I) + X + 2H) without gradient checkpointing, where
                     8H + 2K + 4I counts what one Llama-style layer saves for backward per token
                     (norm inputs/outputs, q, k, v, attention output, gate, up, act(gate),
                     gate*up) and X is LoRA's own: per adapted module the one-byte dropout mask
                     (``in`` bytes, only when dropout > 0) and the rank-r intermediate. The
                     module's input is the layer's, shared by every adapter that reads it (the
                     engine keeps it shared under autocast too: worker/training/lora_dropout.py).
                     Checked against the tensors autograd saves on the tiny Llamas, fp32 and bf16
                     autocast (tests/shared/test_estimate.py): 3% to 44% above, in every case
                     measured.
                     With gradient checkpointing only the layer inputs are kept, plus one layer
                     recomputed during backward: N * a * (L * H + (8H + 2K + 4I) + X / L + 2H).
                     On a GPU attention is taken as SDPA/flash (memory linear in sequence length);
                     on CPU with packing the masked math kernel keeps batch * heads * seq^2
                     probabilities per layer, which is added.
- ``logits``       = min(N, 1024) * V * 4 * 2: the engine computes the loss in chunks of 1024
                     tokens, never the full-vocabulary fp32 logits of the whole batch; a chunk's
                     logits and their gradient are alive at once.
- ``overhead``     = 10% of the above (allocator fragmentation), plus 512 MiB for the CUDA
                     context when a GPU is given.
- ``total``        = the sum of all the above; ``fits`` = total <= gpu_memory_bytes.

Strategies (``training.strategy``; both are always reported under ``strategies``, and
``memory_bytes``/``fits`` are those of the one the job runs with, ``strategy``). The terms above
are DDP's: every process holds a whole replica. Under FSDP2 over ``W`` processes the frozen base,
the adapters, their gradients and the optimizer state are sharded, while the activations, the
backward and the logits (one process's batch) stay what they are:

- ``weights``      = P * w / W, plus what is gathered at once: the unsharded root (LM head, or the
                     tied embedding: the loss runs it once per chunk, so it stays gathered for the
                     whole step) and two decoder layers (the one computing and the one prefetched).
- ``lora_weights`` = 4T / W, + 2T under bf16/fp16 (autocast's copies are made of the gathered
                     adapters of every layer and live until the step's forward ends).
- ``gradients``    = 4T / W sharded + 4T unsharded (accumulated between reductions).
- ``optimizer``    = 8T / W.

``auto`` picks DDP when a whole replica fits one device (``choose_strategy``): DDP is faster
then, since FSDP re-gathers the frozen base at every micro-step. One process never shards.

Precision by GPU: ``auto`` trains in bf16 only where the GPU supports it (compute capability >= 8.0:
A100, H100, L4, RTX 30xx...); the engine loads fp32 weights and trains without autocast on older
ones (V100, T4, P100, RTX 20xx...), so there weights and activations count 4 bytes a value. The
GPU is known by its registered type name (``gpu_type``, e.g. "Tesla V100-SXM2-16GB"): names of
pre-Ampere GPUs are listed in ``_NO_BF16``; an unknown or missing name is taken as bf16-capable.
An explicit ``bf16`` on such a GPU gets a warning (the engine refuses it).

Step counts: global batch = batch_size * world_size * gradient_accumulation_steps sequences;
with packing an epoch has ceil(dataset_tokens / max_seq_length) sequences, otherwise one per row.

DPO (``method.type`` dpo): a row holds whole pairs, chosen and rejected side by side, so it is up
to ``2 * max_seq_length`` tokens wide and ``N`` doubles; unpacked, a row is one pair. The
reference forward (adapter off) runs without autograd and keeps nothing for backward: it adds
compute, not activation memory beyond what the backward term already covers.
"""

from __future__ import annotations

import math
import re
from typing import Any

from shared.modelinfo import ModelInfo, lora_trainable_params, resolve_target_modules
from shared.spec import JobSpec

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "LOSS_CHUNK_TOKENS",
    "STRATEGIES",
    "choose_strategy",
    "estimate",
    "gpu_supports_bf16",
    "resolve_precision",
    "row_width",
]

LOSS_CHUNK_TOKENS = 1024
CUDA_CONTEXT_BYTES = 512 * 1024**2
_SLACK = 0.10
_GIB = 1024**3


# Pre-Ampere NVIDIA GPUs (compute capability < 8.0), matched as whole words in the type name:
# Volta, Turing, Pascal, Maxwell, Kepler data-centre and workstation parts, and GeForce 10/16/20.
_NO_BF16 = re.compile(
    r"\b(V100|T4|T4G|P100|P40|P6|P4|K80|K40|K20|M60|M40|M10|M4|TITAN V|TITAN RTX|TITAN XP?"
    r"|QUADRO (RTX|GV|GP|P|T)\s?\d*|GTX|RTX 20\d\d|RTX 2060|RTX 2070|RTX 2080)\b",
    re.IGNORECASE,
)


def gpu_supports_bf16(gpu_type: str | None) -> bool:
    """Whether a GPU of this registered type name trains in bf16 (unknown names: assumed so)."""
    return not (gpu_type and _NO_BF16.search(gpu_type))


def resolve_precision(precision: str, on_gpu: bool, gpu_type: str | None = None) -> str:
    """The precision a job runs at, as the engine decides it: ``auto`` is bf16 on a GPU that
    supports it, fp32 on older GPUs and on CPU."""
    if precision == "auto":
        return "bf16" if on_gpu and gpu_supports_bf16(gpu_type) else "fp32"
    return precision


STRATEGIES = ("ddp", "fsdp")


def choose_strategy(
    requested: str, world_size: int, ddp_bytes: int, limit_bytes: float | None
) -> str:
    """The strategy a job runs with: ``requested`` unless it is ``auto``, then DDP when a whole
    replica (``ddp_bytes`` per process) fits ``limit_bytes`` (one process's memory; None: no
    known limit), else FSDP. One process never shards: there is nothing to shard over.

    The engine makes the same call at start with its devices' real memory, so the job object
    and ``POST /estimate`` agree with what ran whenever the fleet's registration is current.
    """
    if world_size <= 1:
        return "ddp"
    if requested in STRATEGIES:
        return requested
    if limit_bytes is None or ddp_bytes <= limit_bytes:
        return "ddp"
    return "fsdp"


def _fsdp_gathered_parameters(info: ModelInfo) -> int:
    """Parameters FSDP holds unsharded at the peak: the root (LM head or the tied embedding,
    gathered for the whole step) and two decoder layers (computing + prefetched)."""
    embedding = info.vocab_size * info.hidden_size
    head = 0 if info.tie_word_embeddings else embedding
    layers = max(info.total_parameters - embedding - head, 0)
    return embedding + 2 * math.ceil(layers / max(info.num_layers, 1))


def _with_overhead(memory: dict[str, int], on_gpu: bool) -> dict[str, int]:
    subtotal = sum(memory.values())
    overhead = int(subtotal * _SLACK) + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    return {**memory, "overhead": overhead, "total": subtotal + overhead}


def row_width(spec: JobSpec) -> int:
    """Tokens of one row: ``max_seq_length``, doubled for DPO (a row holds whole pairs)."""
    return spec.training.max_seq_length * (2 if spec.method.is_dpo else 1)


def _steps(
    spec: JobSpec, world_size: int, rows: int | None, tokens: int | None
) -> dict[str, int | None]:
    t = spec.training
    global_batch = t.batch_size * world_size * t.gradient_accumulation_steps
    if t.packing:
        width = row_width(spec)
        sequences = math.ceil(tokens / width) if tokens is not None else None
    else:
        sequences = rows
    per_epoch = max(1, math.ceil(sequences / global_batch)) if sequences is not None else None
    if t.max_steps is not None:
        total: int | None = t.max_steps
    else:
        total = per_epoch * t.epochs if per_epoch is not None else None
    return {
        "global_batch": global_batch,
        "sequences_per_epoch": sequences,
        "steps_per_epoch": per_epoch,
        "total_steps": total,
    }


def estimate(
    spec: JobSpec,
    info: ModelInfo,
    world_size: int = 1,
    gpu_memory_bytes: int | None = None,
    *,
    dataset_rows: int | None = None,
    dataset_tokens: int | None = None,
    base_weight_bytes: float | None = None,
    gpu_type: str | None = None,
    cpu_memory_per_process: int | None = None,
) -> dict[str, Any]:
    """Estimate parameters, per-device memory and steps of ``spec`` on ``info``.

    ``gpu_memory_bytes`` is one device's memory; ``None`` means a CPU run (``fits`` is then
    ``None``: the caller judges the host's RAM, shared by all processes, see
    ``shared.services.fleet.judge``). ``cpu_memory_per_process`` is that RAM's share per
    process on a CPU run: ``auto`` strategy compares a replica with it. ``dataset_rows``/
    ``dataset_tokens`` (from the uploaded file's summary) add ``tokens_per_epoch`` and step
    counts. Raises ``ValueError`` when ``target_modules`` match nothing in the model.
    ``gpu_type`` (the worker's registered GPU name) decides what ``auto`` precision means there
    (see the module doc).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    on_gpu = gpu_memory_bytes is not None
    precision = resolve_precision(spec.training.precision, on_gpu, gpu_type)
    half = precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    w_bytes = base_weight_bytes if base_weight_bytes is not None else (2 if half else 4)

    lora = spec.lora
    trainable = lora_trainable_params(info, lora.target_modules, lora.r)
    adapted = resolve_target_modules(info, lora.target_modules)
    shapes = {**info.linear_modules, **info.embedding_modules}
    # In activation values: the engine fuses LoRA dropout into lora_A and keeps only a one-byte
    # mask per element (the input itself is kept for lora_A's gradient with or without dropout).
    dropout_values = 1 / act_bytes if lora.dropout > 0 else 0
    lora_extra = sum(shapes[m][0] * dropout_values + lora.r for m in adapted)

    t = spec.training
    tokens = t.batch_size * row_width(spec)
    h, layers = info.hidden_size, max(info.num_layers, 1)
    kv = info.num_kv_heads * info.head_dim
    per_layer = 8 * h + 2 * kv + 4 * info.intermediate_size
    if t.gradient_checkpointing:
        values = layers * h + per_layer + lora_extra / layers + 2 * h
    else:
        values = layers * per_layer + lora_extra + 2 * h
    activations = int(tokens * act_bytes * values)
    # Attention keeps no seq^2 scores: packed or not, the engine runs causal SDPA per document
    # (worker/training/attention.py), whose kernels keep only outputs and log-sum-exps.
    logits = min(tokens, LOSS_CHUNK_TOKENS) * info.vocab_size * 4 * 2

    batch_terms = {
        "activations": activations,
        # While a layer's backward runs, the gradients of its intermediates coexist with the
        # activations still saved below it: about one layer's worth. Measured on CPU (whole run,
        # tests/worker/test_estimate_vs_measured.py) the estimate was 19% low without it.
        "backward": int(tokens * act_bytes * per_layer),
        "logits": logits,
    }
    ddp = _with_overhead(
        {
            "weights": int(info.total_parameters * w_bytes),
            "lora_weights": (6 if half else 4) * trainable,
            "gradients": 4 * trainable * (2 if world_size > 1 else 1),
            "optimizer": 8 * trainable,
            **batch_terms,
        },
        on_gpu,
    )
    if world_size > 1:
        shard = world_size
        fsdp = _with_overhead(
            {
                "weights": int(
                    (info.total_parameters / shard + _fsdp_gathered_parameters(info)) * w_bytes
                ),
                "lora_weights": math.ceil(4 * trainable / shard) + (2 * trainable if half else 0),
                "gradients": math.ceil(4 * trainable / shard) + 4 * trainable,
                "optimizer": math.ceil(8 * trainable / shard),
                **batch_terms,
            },
            on_gpu,
        )
    else:
        fsdp = ddp  # one process: FSDP would hold everything, as DDP does (and is not used)
    limit = gpu_memory_bytes if on_gpu else cpu_memory_per_process
    strategy = choose_strategy(t.strategy, world_size, ddp["total"], limit)
    memory = ddp if strategy == "ddp" else fsdp
    strategies = {
        name: {
            "memory_bytes": table,
            "fits": table["total"] <= limit if limit is not None else None,
        }
        for name, table in (("ddp", ddp), ("fsdp", fsdp))
    }

    warnings: list[str] = []
    limit = info.max_position_embeddings
    if isinstance(limit, int) and t.max_seq_length > limit:
        warnings.append(
            f"training.max_seq_length {t.max_seq_length} exceeds the model's "
            f"max_position_embeddings {limit}"
        )
    if precision == "fp16":
        warnings.append("fp16 needs loss scaling and can overflow; prefer bf16 where supported")
    if precision == "bf16" and on_gpu and not gpu_supports_bf16(gpu_type):
        warnings.append(
            f"training.precision bf16: {gpu_type} has no bf16 support; use fp16, fp32 or auto"
        )

    fits: bool | None
    if gpu_memory_bytes is None:
        fits = None
        reason = (
            f"no GPU memory given (CPU run): needs about {memory['total'] / _GIB:.2f} GiB of RAM "
            "per process"
        )
    else:
        fits = memory["total"] <= gpu_memory_bytes
        need, have = memory["total"] / _GIB, gpu_memory_bytes / _GIB
        if fits:
            reason = f"needs about {need:.2f} GiB per device of {have:.2f} GiB ({strategy})"
        elif strategy == "ddp" and strategies["fsdp"]["fits"] and world_size > 1:
            sharded = fsdp["total"] / _GIB
            reason = (
                f"needs about {need:.2f} GiB per device with training.strategy ddp but the GPU "
                f"has {have:.2f} GiB; fsdp over {world_size} processes needs about "
                f"{sharded:.2f} GiB: set training.strategy to fsdp or auto"
            )
        else:
            biggest = max(("activations", "logits", "weights"), key=lambda k: memory[k])
            hint = {
                "activations": "lower training.batch_size or max_seq_length, "
                "or set training.gradient_checkpointing",
                "logits": "lower training.batch_size or max_seq_length",
                "weights": "use a GPU with more memory or a smaller base model, or shard it "
                "over more GPUs (resources.gpus) with training.strategy fsdp or auto",
            }[biggest]
            reason = (
                f"needs about {need:.2f} GiB per device ({strategy}) but the GPU has "
                f"{have:.2f} GiB; largest part: {biggest} ({memory[biggest] / _GIB:.2f} GiB): "
                f"{hint}"
            )

    total_params = info.total_parameters
    steps = _steps(spec, world_size, dataset_rows, dataset_tokens)
    return {
        "parameters": {
            "total": total_params,
            "trainable": trainable,
            "trainable_percent": round(100 * trainable / total_params, 4) if total_params else 0,
        },
        "memory_bytes": memory,
        "strategy": strategy,
        "strategies": strategies,
        "precision": precision,
        "method": spec.method.type,
        "world_size": world_size,
        "target_modules": len(adapted),
        "tokens_per_step": tokens * world_size * t.gradient_accumulation_steps,
        "tokens_per_epoch": dataset_tokens,
        **steps,
        "fits": fits,
        "reason": reason,
        "warnings": warnings,
    }
