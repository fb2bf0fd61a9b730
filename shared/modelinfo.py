"""What a base model is, read from its files alone: no torch, no weights loaded.

The API must answer ``POST /estimate`` and refuse a job whose ``target_modules`` match nothing
before anything is queued, and it never imports torch. A safetensors file starts with an 8-byte
little-endian header length and a JSON header ``{name: {"dtype", "shape", "data_offsets"}}``, so
every tensor's name and shape is known after reading a few kilobytes, even for a 70B model.

The module list is derived from 2-D ``*.weight`` tensors, the way peft sees ``nn.Linear``:
``name -> (in_features, out_features)``. Two layouts need care:

- GPT-2-family ``Conv1D`` (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) stores the weight as
  (in, out); ``nn.Linear`` stores (out, in).
- Tied embeddings: the file holds one copy (safetensors refuses shared tensors); the model still
  has an ``lm_head`` module, and a checkpoint that does hold both is counted once.

Quantised checkpoints (packed int4 tensors) are not understood: their counts would be wrong.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelInfo",
    "lora_trainable_params",
    "read_model_info",
    "read_safetensors_header",
    "resolve_base_model",
    "resolve_target_modules",
    "default_target_modules",
]

# Bytes per element of each safetensors dtype, and the torch name users know it by.
DTYPES: dict[str, tuple[float, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# Model types whose attention/MLP use transformers' Conv1D, which stores weights as (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Last name component of the output head: excluded from 'all-linear', as peft excludes
# get_output_embeddings().
HEAD_NAMES = frozenset({"lm_head", "embed_out", "output_layer"})
EMBEDDING_NAMES = frozenset(
    {"wte", "wpe", "embed_tokens", "embed_in", "tok_embeddings", "embed_positions", "embeddings"}
)

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


@dataclass(frozen=True)
class ModelInfo:
    """A model's shape as read from ``config.json`` and the safetensors headers.

    ``linear_modules`` maps every linear layer's module name (as in ``model.named_modules()``)
    to ``(in_features, out_features)``; ``embedding_modules`` maps embeddings to
    ``(num_embeddings, embedding_dim)``, which peft can adapt too when named explicitly.
    """

    path: Path
    model_type: str
    architectures: tuple[str, ...]
    dtype: str
    total_parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    linear_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    embedding_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    weight_bytes: int = 0

    @property
    def head_dim(self) -> int:
        """Per-head width (q); k/v have ``num_kv_heads`` heads of this width."""
        return self.hidden_size // max(self.num_heads, 1)

    @property
    def bytes_per_parameter(self) -> float:
        """Average stored bytes per parameter (2 for a bf16 checkpoint)."""
        return self.weight_bytes / self.total_parameters if self.total_parameters else 0.0

    def module_suffixes(self) -> list[str]:
        """Last name components of the targetable modules, sorted: what users write."""
        names = {n.rsplit(".", 1)[-1] for n in (*self.linear_modules, *self.embedding_modules)}
        return sorted(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-module table) for API answers and job manifests."""
        return {
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "dtype": self.dtype,
            "parameters": self.total_parameters,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "modules": self.module_suffixes(),
        }


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Return the tensor table of one ``.safetensors`` file (``__metadata__`` dropped).

    Reads only the header, so it costs the same for a 100 KB and a 10 GB file.
    """
    path = Path(path)
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: header length {length} is not a safetensors header")
        blob = fh.read(length)
    if len(blob) != length:
        raise ValueError(f"{path.name}: truncated safetensors header")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("shape"), list)
            and entry.get("dtype") in DTYPES
        ):
            raise ValueError(f"{path.name}: tensor {name!r} has no valid dtype/shape")
    return header


def _tensor_table(model_dir: Path) -> dict[str, dict[str, Any]]:
    """All tensors of a model folder: ``model.safetensors`` or the shards of its index."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index.name}: no readable weight_map ({exc})") from exc
        table: dict[str, dict[str, Any]] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise ValueError(f"{index.name}: shard name {shard!r} leaves the model folder")
            table.update(read_safetensors_header(model_dir / shard))
        missing = set(weight_map) - set(table)
        if missing:
            raise ValueError(f"{index.name}: {len(missing)} indexed tensors are in no shard")
        return table
    if single.is_file():
        return read_safetensors_header(single)
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(others) == 1:  # e.g. adapter-style or renamed single files
        return read_safetensors_header(model_dir / others[0])
    if (model_dir / "pytorch_model.bin").exists() or list(model_dir.glob("pytorch_model*.bin")):
        raise ValueError(
            f"{model_dir.name}: only .bin weights; lorafleet reads safetensors "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    raise ValueError(f"{model_dir.name}: no model.safetensors or model.safetensors.index.json")


def _first(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    if last in HEAD_NAMES:  # GPT-NeoX's head is "embed_out": a Linear
        return False
    return last in EMBEDDING_NAMES or last.endswith(("_embeddings", "_embedding"))


def read_model_info(path: Path | str) -> ModelInfo:
    """Read a local model folder (``config.json`` + safetensors) into a :class:`ModelInfo`.

    Raises ``ValueError`` naming the file when the folder is not a readable transformers model.
    """
    model_dir = Path(path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir.name}: no config.json (not a transformers model folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_dir.name}/config.json: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir.name}/config.json: not a JSON object")
    # Multimodal wrappers keep the language model's numbers in text_config.
    text_config = config.get("text_config")
    text: dict[str, Any] = text_config if isinstance(text_config, dict) else {}
    merged = {**config, **{k: v for k, v in text.items() if v is not None}}

    model_type = str(config.get("model_type") or "")
    architectures = tuple(str(a) for a in config.get("architectures") or ())
    conv1d = model_type in CONV1D_MODEL_TYPES or any(a.startswith("GPT2") for a in architectures)
    hidden = int(_first(merged, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(merged, "num_attention_heads", "n_head", "num_heads", default=0))
    kv_heads = _first(merged, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if merged.get("multi_query") else heads
    inner = _first(merged, "intermediate_size", "n_inner", "ffn_dim", "d_ff")
    tie = bool(_first(merged, "tie_word_embeddings", default=True))

    table = _tensor_table(model_dir)
    total = 0
    weight_bytes = 0
    dtype_counts: Counter[str] = Counter()
    linear: dict[str, tuple[int, int]] = {}
    embeddings: dict[str, tuple[int, int]] = {}
    for name, entry in table.items():
        shape = [int(d) for d in entry["shape"]]
        count = math.prod(shape)
        total += count
        weight_bytes += int(count * DTYPES[entry["dtype"]][0])
        if entry["dtype"] in _FLOAT_DTYPES:
            dtype_counts[entry["dtype"]] += count
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if _is_embedding(module):
            embeddings[module] = (shape[0], shape[1])
        elif conv1d and module.rsplit(".", 1)[-1] in CONV1D_NAMES:
            linear[module] = (shape[0], shape[1])  # Conv1D: (in, out)
        else:
            linear[module] = (shape[1], shape[0])  # nn.Linear: (out, in)

    heads_present = [m for m in linear if m.rsplit(".", 1)[-1] in HEAD_NAMES]
    input_embeddings = [m for m, s in embeddings.items() if s[0] == _vocab_guess(merged, s)]
    if tie and heads_present and input_embeddings:
        # A checkpoint holding both copies of a tied matrix: the model has one parameter.
        head = heads_present[0]
        if embeddings[input_embeddings[0]] == linear[head][::-1]:
            count = math.prod(linear[head])
            total -= count
            weight_bytes -= int(count * DTYPES[table[head + ".weight"]["dtype"]][0])
    elif tie and not heads_present and input_embeddings and _has_lm_head(architectures):
        # Tied and stored once: the model still has an lm_head module (peft can target it).
        vocab_rows, dim = embeddings[input_embeddings[0]]
        linear["lm_head"] = (dim, vocab_rows)

    vocab = int(_first(merged, "vocab_size", default=0)) or (
        embeddings[input_embeddings[0]][0] if input_embeddings else 0
    )
    dtype = DTYPES[dtype_counts.most_common(1)[0][0]][1] if dtype_counts else "unknown"
    return ModelInfo(
        path=model_dir,
        model_type=model_type,
        architectures=architectures,
        dtype=dtype,
        total_parameters=total,
        hidden_size=hidden,
        num_layers=int(_first(merged, "num_hidden_layers", "n_layer", "num_layers", default=0)),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        vocab_size=vocab,
        intermediate_size=int(inner) if inner else 4 * hidden,
        max_position_embeddings=_first(
            merged, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length"
        ),
        tie_word_embeddings=tie,
        linear_modules=linear,
        embedding_modules=embeddings,
        weight_bytes=weight_bytes,
    )


def _vocab_guess(config: Mapping[str, Any], shape: tuple[int, int]) -> int:
    """The config's vocab size, or the embedding's own rows when the config has none."""
    return int(config.get("vocab_size") or shape[0])


def _has_lm_head(architectures: Iterable[str]) -> bool:
    suffixes = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    return any(a.endswith(suffixes) for a in architectures)


def _matches(module: str, target: str) -> bool:
    """peft's rule for a list of names: equal, or ends with '.' + target."""
    return module == target or module.endswith("." + target)


# The attention projections LoRA adapts when a job names none, by module-naming family (the
# same modules peft's per-architecture defaults pick): Llama/Qwen2/Mistral/Gemma..., GPT-2,
# GPT-NeoX/Falcon/Bloom, Phi-3, MPT. A model with none of them gets every linear layer.
DEFAULT_TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("query_key_value",),
    ("qkv_proj",),
    ("Wqkv",),
)


def default_target_modules(suffixes: Iterable[str]) -> list[str] | str:
    """``lora.target_modules`` for a job that gave none, from the model's module suffixes."""
    have = set(suffixes)
    for family in DEFAULT_TARGET_FAMILIES:
        if all(name in have for name in family):
            return list(family)
    return "all-linear"


def resolve_target_modules(
    info: ModelInfo, target_modules: Iterable[str] | str | None
) -> list[str]:
    """The module names peft would adapt for ``target_modules``, in file order.

    ``None`` (a job that named none) means ``default_target_modules`` of the model.

    ``'all-linear'`` is every linear layer except the output head (as peft does). Otherwise each
    target matches modules whose name equals it or ends with ``'.' + target``; a target that
    matches nothing is an error naming it and the suffixes that exist, so a job for a GPT-2 model
    asking for ``q_proj`` is refused before it is queued rather than failing on a GPU an hour later.
    """
    if target_modules is None:
        target_modules = default_target_modules(info.module_suffixes())
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(
                f"target_modules {target_modules!r}: give a list of module names or 'all-linear'"
            )
        found = [m for m in info.linear_modules if m.rsplit(".", 1)[-1] not in HEAD_NAMES]
        if not found:
            raise ValueError("target_modules 'all-linear': the model has no linear layers")
        return found
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")
    candidates = [*info.linear_modules, *info.embedding_modules]
    missing = [t for t in targets if not any(_matches(m, t) for m in candidates)]
    if missing:
        raise ValueError(
            f"target_modules {missing} match no module of this {info.model_type or 'model'}; "
            f"available: {', '.join(info.module_suffixes())}"
        )
    return [m for m in candidates if any(_matches(m, t) for t in targets)]


def lora_trainable_params(
    info: ModelInfo, target_modules: Iterable[str] | str | None, r: int
) -> int:
    """Exact LoRA parameter count: ``sum(r * (in + out))`` over the matched modules.

    A LoRA pair on an (in -> out) layer is A: in x r and B: r x out. For an embedding the pair is
    (num_embeddings x r, r x dim), the same formula. GQA models have narrow k/v projections, so
    this is read from the real shapes, never from hidden_size alone.
    """
    if r < 1:
        raise ValueError(f"r must be at least 1, got {r}")
    shapes = {**info.linear_modules, **info.embedding_modules}
    return sum(r * sum(shapes[m]) for m in resolve_target_modules(info, target_modules))


def _allowed(hub_id: str, allowed_hub: str | Iterable[str]) -> bool:
    patterns = (
        [p.strip() for p in allowed_hub.split(",")]
        if isinstance(allowed_hub, str)
        else [p.strip() for p in allowed_hub]
    )
    return any(p and fnmatch.fnmatchcase(hub_id, p) for p in patterns)


def resolve_base_model(
    name: str, models_dir: Path | str, allowed_hub: str | Iterable[str]
) -> Path | str:
    """Turn a job's ``base_model`` into a local folder (``Path``) or an allowed hub id (``str``).

    A job body must never make the server read an arbitrary path, so only two forms pass:

    - a folder name (no separators, no ``..``) inside ``models_dir``; an ``org/name`` that exists
      as ``models_dir/org/name`` (a local mirror of a hub model) counts as local too;
    - an ``org/name`` hub id matching ``allowed_hub``: comma-separated ids or shell patterns
      (``"*"`` any id, ``"my-org/*"``, ``""`` none), e.g. ``Settings.allowed_hub_models``.

    Anything else raises ``ValueError`` with the reason and, for unknown names, what exists.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("base_model is empty")
    if name != name.strip() or "\x00" in name or "\\" in name:
        raise ValueError(f"base_model {name!r}: not a model name")
    if name.startswith(("/", "~")) or Path(name).is_absolute():
        raise ValueError(f"base_model {name!r}: absolute paths are not accepted; use a folder name")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"base_model {name!r}: '.', '..' and empty path parts are not accepted")
    root = Path(models_dir)
    if len(parts) == 1:
        if not _FOLDER.match(name):
            raise ValueError(f"base_model {name!r}: not a valid model folder name")
        folder = root / name
        if folder.is_dir():
            return folder
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(
            f"base_model {name!r}: no such model folder in {root} "
            f"(available: {', '.join(available) or 'none'}); hub ids look like org/name"
        )
    if len(parts) != 2 or not _HUB_ID.match(name):
        raise ValueError(
            f"base_model {name!r}: path separators are only accepted in a hub id (org/name)"
        )
    mirror = root / parts[0] / parts[1]
    if mirror.is_dir():
        return mirror
    if not _allowed(name, allowed_hub):
        raise ValueError(
            f"base_model {name!r}: not a model folder in {root} and not an allowed hub id "
            "(LORAFLEET_ALLOWED_HUB_MODELS)"
        )
    return name
