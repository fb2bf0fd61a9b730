"""The job estimate: exact parameter counts, memory terms that follow the documented formulas,
and an activation model that stays close to (and above) what autograd really keeps."""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from shared.estimate import CUDA_CONTEXT_BYTES, choose_strategy, estimate, gpu_supports_bf16
from shared.modelinfo import ModelInfo, read_model_info
from shared.spec import JobSpec
from tests.shared.test_modelinfo import write_model

GIB = 1024**3


def spec(lora: dict[str, Any] | None = None, **training: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": "m",
            "training_file": "file-1",
            "lora": {"r": 8, "dropout": 0.0, "target_modules": ["dense"], **(lora or {})},
            "training": {"batch_size": 2, "max_seq_length": 128, **training},
        }
    )


@pytest.fixture
def square(tmp_path: Path) -> ModelInfo:
    """One 1000x1000 linear layer in a one-layer model with a 10-token vocabulary."""
    folder = write_model(
        tmp_path / "square",
        {
            "model_type": "custom",
            "hidden_size": 1000,
            "num_hidden_layers": 1,
            "vocab_size": 10,
            "num_attention_heads": 10,
            "intermediate_size": 1000,
            "max_position_embeddings": 256,
        },
        {"layer.dense.weight": ("F32", [1000, 1000])},
    )
    return read_model_info(folder)


def test_thousand_square_at_rank_8(square: ModelInfo) -> None:
    result = estimate(spec(), square, 1, None)
    assert result["parameters"] == {
        "total": 1_000_000,
        "trainable": 16_000,
        "trainable_percent": 1.6,
    }
    memory = result["memory_bytes"]
    assert memory["weights"] == 4_000_000  # fp32 on CPU
    assert memory["lora_weights"] == memory["gradients"] == 64_000
    assert memory["optimizer"] == 128_000
    assert memory["logits"] == 256 * 10 * 4 * 2  # 2 x 128 tokens < one 1024-token chunk
    parts = sum(v for k, v in memory.items() if k not in ("overhead", "total"))
    assert memory["total"] == parts + memory["overhead"]
    assert result["precision"] == "fp32"
    assert result["fits"] is None and "CPU" in result["reason"]


def test_precision_ddp_and_fit(square: ModelInfo) -> None:
    cpu = estimate(spec(), square, 1, None)["memory_bytes"]
    gpu = estimate(spec(), square, 2, 80 * GIB)
    memory = gpu["memory_bytes"]
    assert gpu["precision"] == "bf16"
    assert memory["weights"] == cpu["weights"] // 2
    assert memory["lora_weights"] == cpu["lora_weights"] * 3 // 2  # + autocast's copies
    assert memory["activations"] == cpu["activations"] // 2
    assert memory["gradients"] == 2 * cpu["gradients"]  # DDP buckets
    assert memory["overhead"] >= CUDA_CONTEXT_BYTES
    assert gpu["fits"] is True and "80.00 GiB" in gpu["reason"]
    small = estimate(spec(), square, 1, 256 * 1024**2)
    assert small["fits"] is False and "largest part" in small["reason"]
    fp32 = estimate(spec(precision="fp32"), square, 1, 80 * GIB)["memory_bytes"]
    assert fp32["weights"] == cpu["weights"]


@pytest.mark.parametrize(
    ("gpu_type", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", True),
        ("NVIDIA A100-SXM4-40GB", True),
        ("NVIDIA L4", True),
        ("NVIDIA GeForce RTX 3090", True),
        ("NVIDIA RTX A6000", True),
        ("Tesla V100-SXM2-16GB", False),
        ("Tesla T4", False),
        ("Tesla P100-PCIE-16GB", False),
        ("NVIDIA GeForce RTX 2080 Ti", False),
        ("Quadro RTX 8000", False),
        ("NVIDIA TITAN V", False),
        (None, True),
    ],
)
def test_precision_follows_the_gpu_type(
    square: ModelInfo, gpu_type: str | None, bf16: bool
) -> None:
    assert gpu_supports_bf16(gpu_type) is bf16
    auto = estimate(spec(), square, 1, 16 * GIB, gpu_type=gpu_type)
    assert auto["precision"] == ("bf16" if bf16 else "fp32")
    cpu = estimate(spec(), square, 1, None)["memory_bytes"]
    # weights are not undercounted on a GPU that trains in fp32
    assert auto["memory_bytes"]["weights"] == cpu["weights"] // (2 if bf16 else 1)
    forced = estimate(spec(precision="bf16"), square, 1, 16 * GIB, gpu_type=gpu_type)
    assert any("no bf16 support" in w for w in forced["warnings"]) is not bf16


def test_logits_are_chunked(square: ModelInfo) -> None:
    long = estimate(spec(batch_size=8, max_seq_length=256), square, 1, None)
    assert long["memory_bytes"]["logits"] == 1024 * 10 * 4 * 2


def test_steps_and_tokens(square: ModelInfo) -> None:
    packed = estimate(spec(gradient_accumulation_steps=2), square, 2, None, dataset_tokens=10_000)
    assert packed["global_batch"] == 8
    assert packed["sequences_per_epoch"] == 79  # ceil(10000 / 128)
    assert packed["steps_per_epoch"] == 10
    assert packed["total_steps"] == 10 and packed["tokens_per_epoch"] == 10_000
    rows = estimate(spec(packing=False, epochs=3), square, 1, None, dataset_rows=9)
    assert (rows["steps_per_epoch"], rows["total_steps"]) == (5, 15)
    capped = estimate(spec(max_steps=7, epochs=50), square, 1, None, dataset_rows=9)
    assert capped["total_steps"] == 7
    unknown = estimate(spec(), square, 1, None)
    assert unknown["tokens_per_epoch"] is None and unknown["total_steps"] is None


def test_warnings_and_errors(square: ModelInfo) -> None:
    result = estimate(spec(max_seq_length=512), square, 1, None)
    assert any("max_position_embeddings 256" in w for w in result["warnings"])
    with pytest.raises(ValueError, match="q_proj"):
        estimate(spec({"target_modules": ["q_proj"]}), square, 1, None)
    with pytest.raises(ValueError, match="world_size"):
        estimate(spec(), square, 0, None)


# --- against the real tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.tiny_models import make_tiny

    # Wider than the default so activations, not constant terms, dominate what is measured.
    return make_tiny(
        tmp_path_factory.mktemp("tiny") / "m", hidden_size=128, layers=3, intermediate=320
    )


def _saved_activation_bytes(model: Any, input_ids: Any) -> int:
    """Bytes of the tensors autograd keeps for backward during the backbone's forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=input_ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("targets", "dropout"),
    [(["q_proj", "v_proj"], 0.0), ("all-linear", 0.0), ("all-linear", 0.05)],
)
def test_tiny_model_counts_and_activations(
    tiny: Path, targets: list[str] | str, dropout: float
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.training.lora_dropout import fuse_lora_dropout

    info = read_model_info(tiny)
    # Unpacked: the forward below has no packing mask (plain causal attention).
    job = spec(
        {"target_modules": targets, "dropout": dropout},
        batch_size=2,
        max_seq_length=256,
        packing=False,
    )
    result = estimate(job, info, 1, None)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_dropout=dropout, target_modules=targets)
    )
    fuse_lora_dropout(model)  # as the engine runs it
    trainable, total = model.get_nb_trainable_parameters()
    assert result["parameters"]["trainable"] == trainable
    assert result["parameters"]["total"] == total - trainable
    model.train()
    torch.manual_seed(0)
    measured = _saved_activation_bytes(model, torch.randint(0, 500, (2, 256)))
    estimated = result["memory_bytes"]["activations"]
    assert measured <= estimated <= 1.6 * measured, (estimated, measured)
    checkpointed = estimate(
        spec({"target_modules": targets, "dropout": dropout}, gradient_checkpointing=True),
        info,
        1,
        None,
    )
    assert checkpointed["memory_bytes"]["activations"] < estimated / 2


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_bf16_autocast_keeps_one_input_per_layer(tiny: Path, targets: list[str] | str) -> None:
    """As on a GPU (bf16 base, fp32 adapters, bf16 autocast): the adapters of a layer share its
    input instead of each keeping a cast copy (issue 15.8), and the estimate still covers it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.training.lora_dropout import fuse_lora_dropout

    info = read_model_info(tiny)
    ids = torch.randint(0, 500, (2, 256))

    def saved(fused: bool) -> int:
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, lora_dropout=0.05, target_modules=targets))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = (
                    param.data.float()
                )  # peft keeps adapters in fp32 (autocast_adapter_dtype)
        if fused:
            fuse_lora_dropout(model)
        model.train()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _saved_activation_bytes(model, ids)

    shared_input, per_module = saved(True), saved(False)
    print(f"saved bytes: fused {shared_input:,}, peft's own {per_module:,}")
    assert shared_input < per_module
    job = spec(
        {"target_modules": targets, "dropout": 0.05},
        batch_size=2,
        max_seq_length=256,
        packing=False,
        precision="bf16",
    )
    estimated = estimate(job, info, 1, 16 * GIB)["memory_bytes"]["activations"]
    assert shared_input <= estimated <= 1.6 * shared_input, (estimated, shared_input)


def write_sparse_llama(
    folder: Path, layers: int = 32, hidden: int = 4096, inter: int = 11008, vocab: int = 32000
) -> Path:
    """A Llama-shaped model folder whose safetensors holds a header and a hole: a 7B model's
    shapes at no disk cost (only the header is ever read here)."""
    tensors: dict[str, tuple[str, list[int]]] = {
        "model.embed_tokens.weight": ("BF16", [vocab, hidden])
    }
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = ("BF16", [hidden, hidden])
        tensors[f"{prefix}.mlp.gate_proj.weight"] = ("BF16", [inter, hidden])
        tensors[f"{prefix}.mlp.up_proj.weight"] = ("BF16", [inter, hidden])
        tensors[f"{prefix}.mlp.down_proj.weight"] = ("BF16", [hidden, inter])
        tensors[f"{prefix}.input_layernorm.weight"] = ("BF16", [hidden])
        tensors[f"{prefix}.post_attention_layernorm.weight"] = ("BF16", [hidden])
    tensors["model.norm.weight"] = ("BF16", [hidden])
    tensors["lm_head.weight"] = ("BF16", [vocab, hidden])
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        out.truncate(8 + len(blob) + offset)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_strategy(body: JobSpec, strategy: str) -> JobSpec:
    training = body.training.model_copy(update={"strategy": strategy})
    return body.model_copy(update={"training": training})


def test_fsdp_shards_what_a_replica_cannot_hold(tmp_path: Path) -> None:
    """A 6.7B bf16 model on 16 GiB GPUs: a replica does not fit, eight shards do; auto picks
    fsdp, an explicit ddp is told how to fit, one process never shards."""
    info = read_model_info(write_sparse_llama(tmp_path / "7b"))
    body = spec(lora={"target_modules": ["q_proj", "v_proj"]}, batch_size=1, max_seq_length=512)
    trainable = info.num_layers * 2 * 8 * (4096 + 4096)
    auto = estimate(body, info, 8, 16 * GIB)
    assert auto["parameters"]["trainable"] == trainable
    ddp, fsdp = (auto["strategies"][name]["memory_bytes"] for name in ("ddp", "fsdp"))
    assert auto["strategy"] == "fsdp" and auto["fits"] is True
    assert auto["memory_bytes"] == fsdp and "(fsdp)" in auto["reason"]
    assert auto["strategies"]["ddp"]["fits"] is False and auto["strategies"]["fsdp"]["fits"]
    # The frozen base shrinks about by the rank count (plus the root and two gathered layers).
    per_layer = (info.total_parameters - 2 * 32000 * 4096) / 32
    gathered = 32000 * 4096 + 2 * per_layer
    assert abs(fsdp["weights"] - 2 * (info.total_parameters / 8 + gathered)) < 64
    assert ddp["weights"] == 2 * info.total_parameters
    assert fsdp["optimizer"] == ddp["optimizer"] // 8
    assert fsdp["activations"] == ddp["activations"] and fsdp["logits"] == ddp["logits"]

    forced = estimate(with_strategy(body, "ddp"), info, 8, 16 * GIB)
    assert forced["strategy"] == "ddp" and forced["fits"] is False
    assert "set training.strategy to fsdp or auto" in forced["reason"]
    roomy = estimate(body, info, 8, 80 * GIB)
    assert roomy["strategy"] == "ddp" and roomy["fits"] is True  # DDP is faster when it fits
    alone = estimate(with_strategy(body, "fsdp"), info, 1, 16 * GIB)
    assert alone["strategy"] == "ddp" and alone["strategies"]["fsdp"] == alone["strategies"]["ddp"]
    assert "training.strategy fsdp" in alone["reason"]  # the weights hint names the way out
    neither = estimate(body, info, 2, 8 * GIB)
    assert neither["strategy"] == "fsdp" and neither["fits"] is False
    assert "largest part" in neither["reason"]


def test_choose_strategy() -> None:
    assert choose_strategy("auto", 1, 10**12, 1) == "ddp"  # one process: nothing to shard
    assert choose_strategy("fsdp", 1, 0, None) == "ddp"
    assert choose_strategy("auto", 2, 10, 10) == "ddp"
    assert choose_strategy("auto", 2, 11, 10) == "fsdp"
    assert choose_strategy("auto", 2, 11, None) == "ddp"  # no known limit (CPU without RAM)
    assert (
        choose_strategy("ddp", 2, 11, 10) == "ddp" and choose_strategy("fsdp", 2, 1, 10) == "fsdp"
    )
