"""The base models a job may name: the folders of ``LORAFLEET_MODELS_DIR``, described.

``GET /models`` (and ``lorafleet models list``) answers "what can I fine-tune here?" with what a
user needs to choose: the parameter count, the context length (``max_position_embeddings``, the
ceiling of ``training.max_seq_length``) and whether the tokenizer has a chat template (without
one, chat rows are rendered as ``Role: content`` blocks). Everything is read from the model's
files (config, safetensors headers, tokenizer config), never by loading weights.

Local mirrors of hub models (``MODELS_DIR/org/name``) are listed under their hub id. Hub ids that
are allowed but not mirrored cannot be listed (the allow-list may be a pattern); the answer says
which pattern applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.modelinfo import read_model_info

__all__ = ["BaseModelInfo", "has_chat_template", "list_base_models"]


@dataclass(frozen=True)
class BaseModelInfo:
    """One model folder as ``GET /models`` lists it (``error`` set when it cannot be read)."""

    id: str
    parameters: int | None
    context_length: int | None
    chat_template: bool
    model_type: str | None
    dtype: str | None
    error: str | None = None


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in ``folder`` carries a chat template (any of its three homes)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        data: Any = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("chat_template"))


def _describe(name: str, folder: Path) -> BaseModelInfo:
    try:
        info = read_model_info(folder)
    except ValueError as exc:
        return BaseModelInfo(name, None, None, has_chat_template(folder), None, None, str(exc))
    context = info.max_position_embeddings
    return BaseModelInfo(
        id=name,
        parameters=info.total_parameters,
        context_length=context if isinstance(context, int) else None,
        chat_template=has_chat_template(folder),
        model_type=info.model_type or None,
        dtype=info.dtype,
    )


def _folders(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if (entry / "config.json").is_file():
            found.append((entry.name, entry))
            continue
        # An org folder of hub mirrors: MODELS_DIR/org/name.
        for inner in sorted(entry.iterdir()):
            if inner.is_dir() and (inner / "config.json").is_file():
                found.append((f"{entry.name}/{inner.name}", inner))
    return found


def list_base_models(settings: Settings) -> list[BaseModelInfo]:
    """Every model folder of the models directory (hub mirrors by hub id), by name."""
    return [_describe(name, folder) for name, folder in _folders(settings.models_path)]
