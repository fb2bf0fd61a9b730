"""Tiny base models built offline: the demo model, the test fixtures and the benchmark models.

No hub download is possible on the machines this project is tested on, so every model the tests,
the demo and the benchmarks train is made here: a Llama-architecture decoder (the layout of most
models users fine-tune: q/k/v/o + gate/up/down, GQA) with random weights from a fixed seed, and a
byte-level BPE tokenizer trained on a small built-in English corpus plus the text of the sample
chat dataset, so the demo data tokenizes into few tokens and a tiny model visibly learns it.

Sizes (parameters as ``sum(p.numel())``, measured; the tokenizer is the same for all):

- ``make_tiny(DIR)``: 139,584 (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 512): tests, demo.
- ``make_tiny(DIR, **TINY_SIZES["5m"])``: 5,180,672 (hidden 256, 6 layers, 8/4 heads, vocab 2048).
- ``make_tiny(DIR, **TINY_SIZES["40m"])``: 41,955,840 (hidden 512, 12 layers, 8/4 heads, vocab
  4096), the size the benchmarks compare against the Trainer.

The model's ``vocab_size`` is its embedding rows. The built-in corpus yields 1,671 tokens at most
(it runs out of merges), so in the larger sizes the remaining rows are unused, as in released
models that pad their vocabulary; ``len(tokenizer) <= vocab_size`` always holds.

Deterministic: the same arguments give byte-identical weights and the same tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "TINY_SIZES",
    "make_tiny",
    "make_tiny_gpt2",
    "sample_chat_rows",
    "write_sample",
]

# Argument sets for the benchmark sizes (see the module docstring for the measured counts).
TINY_SIZES: dict[str, dict[str, int]] = {
    "5m": {
        "hidden_size": 256,
        "layers": 6,
        "heads": 8,
        "kv_heads": 4,
        "intermediate": 640,
        "vocab_size": 2048,
    },
    "40m": {
        "hidden_size": 512,
        "layers": 12,
        "heads": 8,
        "kv_heads": 4,
        "intermediate": 1536,
        "vocab_size": 4096,
    },
}

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML. The {% generation %} block marks the assistant's tokens so that
# apply_chat_template(..., return_assistant_tokens_mask=True) can give the loss mask; the
# closing <|im_end|> is inside it because the model must learn to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small model learns simple patterns from examples.
Fine-tuning adapts a pretrained language model to a new task with a few thousand examples.
Low-rank adaptation trains two small matrices beside each frozen weight, so the update is cheap to
store and easy to share. The training loop reads a batch of text, computes the loss, and updates
the weights. When the loss goes down, the model has learned something about the data.
You are a helpful assistant. Please answer the question briefly and clearly.
What is the weather like today? It is sunny and warm, with a light wind from the west.
How many days are there in a week? There are seven days in a week. There are twelve months in a
year, and a year has three hundred and sixty five days. One hour has sixty minutes, one minute
has sixty seconds, one kilometer has one thousand meters, and one kilogram has one thousand grams.
The cat sat on the mat. The dog ran in the park. Children read books at school, and teachers write
on the board. Water boils at one hundred degrees Celsius. The sun rises in the east and sets in the
west. Numbers: zero one two three four five six seven eight nine ten eleven twelve twenty thirty
forty fifty sixty seventy eighty ninety hundred thousand million. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Question: Answer: Sure, here is the answer. Thank you! Hello, world. Goodbye.
"""

_CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Russia", "Moscow"),
    ("Australia", "Canberra"),
    ("Ireland", "Dublin"),
    ("Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Switzerland", "Bern"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
)

_WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "planet", "window", "silver", "rocket", "forest", "candle",
    "pencil", "orange", "bridge", "winter", "summer", "castle", "dragon", "basket", "mirror",
    "yellow", "purple", "button", "coffee", "guitar", "island", "jacket", "ladder", "market",
    "needle", "pepper", "rabbit", "saddle", "turtle", "violin", "wallet", "zipper", "cloud",
)  # fmt: skip

# (from unit, to unit, factor): "N from is N*factor to".
_UNITS: tuple[tuple[str, str, int], ...] = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


def sample_chat_rows(n: int = 360, seed: int = 0) -> list[dict[str, Any]]:
    """The sample chat dataset (``examples/sample_chat.jsonl``), generated deterministically.

    Six task kinds with one fixed answer pattern each (arithmetic, capitals, unit conversions,
    word reversal, capital letters), so a model of a few hundred thousand parameters already
    lowers its loss within tens of steps: the demo must show learning in minutes on a CPU. It
    lives here, not only in ``examples/make_sample.py``, because the tokenizer's corpus includes
    this text and both must agree even where only the installed package exists.
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    kinds = ("add", "sub", "mul", "capital", "unit", "reverse", "upper")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "add":
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            q, ans = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == "sub":
            a = rng.randint(10, 99)
            b = rng.randint(1, a)
            q, ans = f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q, ans = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
        elif kind == "capital":
            country, city = rng.choice(_CAPITALS)
            q, ans = f"What is the capital of {country}?", f"The capital of {country} is {city}."
        elif kind == "unit":
            src, dst, factor = rng.choice(_UNITS)
            v = rng.randint(1, 20)
            q, ans = f"Convert {v} {src} to {dst}.", f"{v} {src} is {v * factor} {dst}."
        elif kind == "reverse":
            word = rng.choice(_WORDS)
            q, ans = f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."
        else:
            word = rng.choice(_WORDS)
            q, ans = f"Write '{word}' in capital letters.", f"{word.upper()}"
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": ans},
                ]
            }
        )
    return rows


def _corpus() -> list[str]:
    """Tokenizer training text: English prose, the sample dataset and its word lists."""
    lines = _ENGLISH.splitlines()
    for row in sample_chat_rows():
        lines.extend(m["content"] for m in row["messages"])
    lines.extend(f"The capital of {c} is {city}." for c, city in _CAPITALS)
    lines.extend(f"{w} {w.upper()} {w.capitalize()} {w[::-1]}" for w in _WORDS)
    lines.extend(f"{a} + {b} = {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11))
    # Role names follow <|im_start|> in every chat row: give them whole-word tokens.
    lines.extend(["system", "user", "assistant", "tool"] * 200)
    return lines


def _build_tokenizer(vocab_size: int, chat_template: bool) -> Any:
    """Train a byte-level BPE on the built-in corpus and wrap it for transformers.

    Byte-level so that any input (other languages, emoji, code) still encodes without ``<unk>``;
    ``<unk>`` exists only because some callers expect the attribute to be set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK] + ([IM_START, IM_END] if chat_template else [])
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Llama convention: plain encode() starts with <s>. The chat template writes bos itself and
    # apply_chat_template encodes with add_special_tokens=False, so no double <s> there.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END] if chat_template else None,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    max_positions: int = 2048,
    chat_template: bool = True,
    tie_embeddings: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write a random-init Llama model and its tokenizer into ``out_dir``; return ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``
    load the result. ``kv_heads < heads`` on purpose: GQA gives k/v projections narrower than q,
    which is what the estimator and the LoRA parameter count must get right. Weights depend only
    on the arguments (the seed is applied inside a forked RNG, so callers' RNG state is kept).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by heads ({heads}) "
            f"and heads by kv_heads ({kv_heads})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size, chat_template)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(tokenizer)} tokenizer tokens")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _init_model(AutoModelForCausalLM, config, seed, getattr(torch, dtype))
    stop_ids = [tokenizer.eos_token_id]
    if chat_template:
        stop_ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_gpt2(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    max_positions: int = 1024,
) -> Path:
    """Write a random-init GPT-2 model (tied embeddings, Conv1D ``c_attn``/``c_proj``/``c_fc``).

    Exists for the other naming and weight layout users meet: GPT-2's Conv1D stores weights as
    (in, out) and its lm_head is tied to ``wte``, so only one copy is in the file. No chat
    template: GPT-2-style models are fine-tuned on completion or text rows.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size, chat_template=False)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _init_model(AutoModelForCausalLM, config, seed, torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _init_model(auto_cls: Any, config: Any, seed: int, dtype: Any) -> Any:
    """Random init under ``seed`` without touching the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config)
    return model.to(dtype)


def write_sample(path: Path, n: int = 360, seed: int = 0) -> Path:
    """Write ``sample_chat_rows(n, seed)`` as JSONL (one compact object a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_chat_rows(n, seed))
    path.write_text(text, encoding="utf-8")
    return path
