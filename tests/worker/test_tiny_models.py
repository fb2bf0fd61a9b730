"""The tiny models and the sample dataset: loadable, deterministic, learnable.

Every other test, the demo and the benchmarks stand on these fixtures, so their promises are
checked here directly: from_pretrained loads them, the same seed gives the same bytes, the chat
template marks the answer tokens, and a few optimizer steps visibly lower the loss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from shared.datasets import load_examples
from worker.tiny_models import (
    IM_END,
    IM_START,
    TINY_SIZES,
    make_tiny,
    make_tiny_gpt2,
    sample_chat_rows,
    write_sample,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample_chat.jsonl"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_loads_with_auto_classes(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads
    assert (tiny / "model.safetensors").is_file()
    assert not list(tiny.glob("*.bin"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert len(tok) <= model.config.vocab_size
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_same_seed_same_bytes_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(tiny / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(tiny / "tokenizer.json")
    other = make_tiny(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(tiny / "model.safetensors")


def test_global_rng_is_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny(tmp_path / "m", layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_chat_template_marks_the_answer(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<s><|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    out: Any = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(answer) == "2 + 3 = 5.<|im_end|>"
    assert ids.count(tok.bos_token_id) == 1
    # Special tokens are single ids, so the engine can find turn boundaries.
    for special in (IM_START, IM_END):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert tok.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id


def test_byte_level_round_trip(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    for text in ["héllo wörld", "日本語 😀", "def f(x):\n\treturn x  # tab", "  spaces  "]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_sample_text_tokenizes_compactly(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny)
    text = "\n".join(m["content"] for row in sample_chat_rows(70) for m in row["messages"])
    ids = tok(text, add_special_tokens=False).input_ids
    # The corpus includes the sample text: far fewer tokens than bytes (byte fallback = 1.0).
    assert len(ids) / len(text.encode()) < 0.4


def test_no_chat_template_variant(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tiny(tmp_path / "plain", chat_template=False))
    assert not tok.chat_template
    assert IM_START not in tok.get_vocab()


def test_gpt2_variant_uses_conv1d_names_and_ties(tmp_path: Path) -> None:
    path = make_tiny_gpt2(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    modules = dict(model.named_modules())
    assert "transformer.h.0.attn.c_attn" in modules
    head, embedding = modules["lm_head"], modules["transformer.wte"]
    assert isinstance(head, torch.nn.Linear) and isinstance(embedding, torch.nn.Embedding)
    assert head.weight.data_ptr() == embedding.weight.data_ptr()
    assert AutoTokenizer.from_pretrained(path).eos_token == "</s>"


@pytest.mark.parametrize(("size", "low", "high"), [("5m", 4.5e6, 6e6), ("40m", 36e6, 46e6)])
def test_benchmark_sizes(size: str, low: float, high: float) -> None:
    """Counted on the meta device: the sizes the docstring promises, without writing 170 MB."""
    k = TINY_SIZES[size]
    config = LlamaConfig(
        vocab_size=k["vocab_size"],
        hidden_size=k["hidden_size"],
        intermediate_size=k["intermediate"],
        num_hidden_layers=k["layers"],
        num_attention_heads=k["heads"],
        num_key_value_heads=k["kv_heads"],
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_sample_file_is_in_sync_and_valid(tmp_path: Path) -> None:
    regenerated = write_sample(tmp_path / "sample.jsonl")
    assert SAMPLE.read_bytes() == regenerated.read_bytes(), "run examples/make_sample.py"
    assert SAMPLE.stat().st_size < 200_000
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert 300 <= len(rows) <= 400
    assert len({row["messages"][1]["content"] for row in rows}) > 250  # varied
    examples = load_examples(str(SAMPLE))
    assert len(examples) == len(rows)
    assert all(e.format == "chat" for e in examples)


def test_a_few_steps_lower_the_loss(tiny: Path) -> None:
    """The demo's promise: the tiny model visibly learns the sample data within minutes."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    rows = sample_chat_rows(64)
    batch: Any = tok.apply_chat_template(
        [r["messages"] for r in rows],
        tokenize=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0], losses
