"""Model inspection from files alone: shapes, counts and target matching agree with peft.

Synthetic safetensors files (header + zero bytes, written by hand) pin the file format and the
edge cases; the tiny Llama (GQA) and GPT-2 (Conv1D, tied) built by the project pin agreement with
what transformers and peft actually construct.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.modelinfo import (
    default_target_modules,
    lora_trainable_params,
    read_model_info,
    read_safetensors_header,
    resolve_base_model,
    resolve_target_modules,
)

_ITEM = {"F32": 4, "BF16": 2, "F16": 2}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file of zeros: 8-byte LE header length, JSON header, data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = _ITEM[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)
    return path


def write_model(
    folder: Path, config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


LLAMA_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
LLAMA_TENSORS: dict[str, tuple[str, list[int]]] = {
    "model.embed_tokens.weight": ("BF16", [100, 16]),
    "model.layers.0.self_attn.q_proj.weight": ("BF16", [16, 16]),
    "model.layers.0.self_attn.k_proj.weight": ("BF16", [4, 16]),
    "model.layers.0.self_attn.v_proj.weight": ("BF16", [4, 16]),
    "model.layers.0.self_attn.o_proj.weight": ("BF16", [16, 16]),
    "model.layers.0.mlp.gate_proj.weight": ("BF16", [32, 16]),
    "model.layers.0.mlp.up_proj.weight": ("BF16", [32, 16]),
    "model.layers.0.mlp.down_proj.weight": ("BF16", [16, 32]),
    "model.layers.0.input_layernorm.weight": ("BF16", [16]),
    "model.layers.0.post_attention_layernorm.weight": ("BF16", [16]),
    "model.norm.weight": ("BF16", [16]),
    "lm_head.weight": ("BF16", [100, 16]),
}


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return write_model(tmp_path / "syn", LLAMA_CONFIG, LLAMA_TENSORS)


def test_reads_shapes_counts_and_dtype(llama: Path) -> None:
    info = read_model_info(llama)
    assert info.total_parameters == 100 * 16 * 2 + 16 * 16 * 2 + 4 * 16 * 2 + 32 * 16 * 3 + 16 * 3
    assert info.dtype == "bfloat16"
    assert info.weight_bytes == 2 * info.total_parameters
    assert (info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads) == (16, 1, 4, 1)
    assert (info.vocab_size, info.intermediate_size, info.head_dim) == (100, 32, 4)
    assert info.linear_modules["model.layers.0.self_attn.k_proj"] == (16, 4)  # (in, out)
    assert info.linear_modules["model.layers.0.mlp.down_proj"] == (32, 16)
    assert info.embedding_modules == {"model.embed_tokens": (100, 16)}
    assert "model.norm" not in info.linear_modules
    assert info.to_dict()["modules"] == [
        "down_proj",
        "embed_tokens",
        "gate_proj",
        "k_proj",
        "lm_head",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_thousand_square_layer_at_rank_8_is_16000(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "square",
        {"model_type": "custom", "hidden_size": 1000, "vocab_size": 10},
        {"layer.dense.weight": ("F32", [1000, 1000])},
    )
    info = read_model_info(folder)
    assert lora_trainable_params(info, ["dense"], 8) == 16_000
    assert lora_trainable_params(info, "all-linear", 8) == 16_000


def test_sharded_index_reads_every_shard(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    names = list(LLAMA_TENSORS)
    first, second = names[:5], names[5:]
    write_safetensors(
        folder / "model-00001-of-00002.safetensors", {n: LLAMA_TENSORS[n] for n in first}
    )
    write_safetensors(
        folder / "model-00002-of-00002.safetensors", {n: LLAMA_TENSORS[n] for n in second}
    )
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = read_model_info(write_model(tmp_path / "single", LLAMA_CONFIG, LLAMA_TENSORS))
    sharded = read_model_info(folder)
    assert sharded.total_parameters == single.total_parameters
    assert sharded.linear_modules == single.linear_modules


def test_tied_copy_counted_once(tmp_path: Path) -> None:
    config = {**LLAMA_CONFIG, "tie_word_embeddings": True}
    both = read_model_info(write_model(tmp_path / "both", config, LLAMA_TENSORS))
    stored_once = {k: v for k, v in LLAMA_TENSORS.items() if k != "lm_head.weight"}
    once = read_model_info(write_model(tmp_path / "once", config, stored_once))
    assert both.total_parameters == once.total_parameters
    untied = read_model_info(write_model(tmp_path / "untied", LLAMA_CONFIG, LLAMA_TENSORS))
    assert untied.total_parameters == both.total_parameters + 100 * 16
    # The tied head is still a module peft can target.
    assert once.linear_modules["lm_head"] == (16, 100)


def test_gpt2_conv1d_is_in_out(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "g",
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_head": 2},
        {
            "transformer.wte.weight": ("F32", [50, 8]),
            "transformer.h.0.attn.c_attn.weight": ("F32", [8, 24]),
            "transformer.h.0.mlp.c_fc.weight": ("F32", [8, 32]),
            "transformer.h.0.mlp.c_proj.weight": ("F32", [32, 8]),
        },
    )
    info = read_model_info(folder)
    assert info.linear_modules["transformer.h.0.attn.c_attn"] == (8, 24)
    assert info.linear_modules["transformer.h.0.mlp.c_proj"] == (32, 8)
    assert info.num_kv_heads == 2 and info.intermediate_size == 32  # n_inner None -> 4 * n_embd
    assert lora_trainable_params(info, ["c_attn"], 4) == 4 * (8 + 24)


def test_target_matching_follows_peft_rules(llama: Path) -> None:
    info = read_model_info(llama)
    assert resolve_target_modules(info, ["q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    full = "model.layers.0.mlp.up_proj"
    assert resolve_target_modules(info, [full]) == [full]
    assert "lm_head" not in resolve_target_modules(info, "all-linear")
    assert len(resolve_target_modules(info, "all-linear")) == 7
    with pytest.raises(ValueError, match=r"\['proj'\].*available: down_proj"):
        resolve_target_modules(info, ["proj"])  # a suffix must follow a dot
    with pytest.raises(ValueError, match=r"\['c_attn', 'wq'\]"):
        resolve_target_modules(info, ["q_proj", "c_attn", "wq"])
    with pytest.raises(ValueError, match="all-linear"):
        resolve_target_modules(info, "everything")
    with pytest.raises(ValueError):
        lora_trainable_params(info, ["q_proj"], 0)


@pytest.mark.parametrize(
    ("contents", "problem"),
    [
        ({"config.json": "{}"}, "no model.safetensors"),
        ({"model.safetensors": "x"}, "no config.json"),
        ({"config.json": "{}", "pytorch_model.bin": "x"}, "only .bin"),
        ({"config.json": "{}", "model.safetensors": "\xff" * 16}, "header"),
        ({"config.json": "[1]", "model.safetensors": "x"}, "not a JSON object"),
    ],
)
def test_unreadable_folders_say_why(tmp_path: Path, contents: dict[str, str], problem: str) -> None:
    for name, text in contents.items():
        (tmp_path / name).write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=problem):
        read_model_info(tmp_path)


def test_header_reader_checks_length(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(bad)


def test_resolve_base_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "tiny-llama").mkdir(parents=True)
    (models / "mirror-org" / "model-x").mkdir(parents=True)
    assert resolve_base_model("tiny-llama", models, "") == models / "tiny-llama"
    assert resolve_base_model("mirror-org/model-x", models, "") == models / "mirror-org" / "model-x"
    assert resolve_base_model("Qwen/Qwen2.5-0.5B", models, "*") == "Qwen/Qwen2.5-0.5B"
    assert resolve_base_model("my-org/m", models, "other/x, my-org/*") == "my-org/m"
    assert resolve_base_model("a/b", models, ["a/b"]) == "a/b"
    with pytest.raises(ValueError, match="not an allowed hub id"):
        resolve_base_model("Qwen/Qwen2.5-0.5B", models, "")
    with pytest.raises(ValueError, match="not an allowed hub id"):
        resolve_base_model("evil/m", models, "my-org/*")
    with pytest.raises(ValueError, match=r"available: mirror-org, tiny-llama"):
        resolve_base_model("missing", models, "*")
    for bad in ["..", "../etc", "a/../b", "/etc/passwd", "~root", "a/b/c", "a\\b", "./x", " x", ""]:
        with pytest.raises(ValueError, match="base_model"):
            resolve_base_model(bad, models, "*")


# --- agreement with transformers + peft on the project's own tiny models --------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from worker.tiny_models import make_tiny, make_tiny_gpt2

    root = tmp_path_factory.mktemp("models")
    return {"llama": make_tiny(root / "llama"), "gpt2": make_tiny_gpt2(root / "gpt2")}


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", ["k_proj"]),  # GQA: narrower than q
        ("llama", "all-linear"),
        ("llama", ["embed_tokens", "lm_head"]),
        ("gpt2", ["c_attn"]),
        ("gpt2", ["c_proj"]),  # attention and MLP c_proj differ in shape
        ("gpt2", "all-linear"),
        ("gpt2", ["lm_head"]),  # tied, stored once
    ],
)
def test_counts_equal_peft(
    tiny_models: dict[str, Path], arch: str, targets: list[str] | str
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tiny_models[arch]
    info = read_model_info(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    assert info.total_parameters == sum(p.numel() for p in base.parameters())
    names = {n for n, m in base.named_modules()}
    assert set(resolve_target_modules(info, targets)) <= names
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_trainable_params(info, targets, 8) == trainable


def test_shared_modules_import_no_torch() -> None:
    code = (
        "import sys, shared.modelinfo, shared.estimate; "
        "bad = [m for m in ('torch', 'api', 'worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_targets_by_naming_family() -> None:
    assert default_target_modules(["q_proj", "k_proj", "v_proj", "o_proj"]) == ["q_proj", "v_proj"]
    assert default_target_modules(["c_attn", "c_proj", "c_fc"]) == ["c_attn"]
    assert default_target_modules(["query_key_value", "dense"]) == ["query_key_value"]
    assert default_target_modules(["qkv_proj", "o_proj"]) == ["qkv_proj"]
    assert default_target_modules(["wq", "wk", "wv"]) == "all-linear"
