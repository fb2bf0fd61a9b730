"""Engine fixtures: tiny models built by the project itself (no hub), sample data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.tiny_models import make_tiny, make_tiny_gpt2, sample_chat_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, tokenizer without a chat template (the documented default format)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-plain", chat_template=False)


@pytest.fixture(scope="session")
def gpt2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", sample_chat_rows(120))


def write_tiny_qwen2(folder: Path) -> Path:
    """A random Qwen2-style model (tied head, q/k/v bias, GQA); weights only, no tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    return folder
