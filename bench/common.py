"""What both benchmarks share: models, data, the machine's matmul peak, memory and FLOP counting.

Every number the benchmarks print is measured in the same invocation (peaks included), because
these machines are shared and their speed drifts from minute to minute.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "data" / "bench-models"
RESULTS = REPO / "bench" / "results"

# The LoRA both contenders train (the DESIGN's job body defaults: q/v, r 8, dropout 0.05).
LORA: dict[str, Any] = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
}

_SENTENCES = (
    "Fine-tuning adapts a pretrained language model to a new task with a few thousand examples.",
    "Low-rank adaptation trains two small matrices beside each frozen weight.",
    "The training loop reads a batch of text, computes the loss, and updates the weights.",
    "When the loss goes down, the model has learned something about the data.",
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius.",
    "Children read books at school, and teachers write on the board.",
    "The quick brown fox jumps over the lazy dog.",
    "There are seven days in a week and twelve months in a year.",
    "One hour has sixty minutes, and one minute has sixty seconds.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "A small model learns simple patterns from examples.",
)


def model_dir(size: str) -> Path:
    """Build (once) and return the tiny benchmark model of ``size`` ("5m" or "40m")."""
    from worker.tiny_models import TINY_SIZES, make_tiny

    folder = CACHE / f"tiny-{size}"
    if not (folder / "model.safetensors").exists():
        make_tiny(folder, **TINY_SIZES[size])  # type: ignore[arg-type]
    return folder


def bench_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows whose lengths vary as real fine-tuning data does (tens to hundreds of tokens).

    A third are the short sample tasks; the rest ask for explanations whose answer length is
    log-uniform in sentences (1-30), so padding to the longest row of a batch wastes a realistic
    share of the token slots and packing has something to win.
    """
    from worker.tiny_models import sample_chat_rows

    rng = random.Random(seed)
    short = sample_chat_rows(n, seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            rows.append(short[i])
            continue
        k = max(1, int(round(2 ** rng.uniform(0, 4.9))))
        answer = " ".join(rng.choice(_SENTENCES) for _ in range(k))
        question = (
            f"Explain, in about {k} sentences, what you know about topic {rng.randint(1, 999)}."
        )
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepClock:
    """A training-progress sink for our engine that notes when each step was reported (and keeps
    every record, for the numbers a benchmark reads afterwards)."""

    def __init__(self, times: list[float]) -> None:
        self.times = times
        self.records: list[Any] = []

    def log(self, record: Any) -> None:
        from worker.training import events

        self.records.append(record)
        if isinstance(record, events.Step):
            self.times.append(time.perf_counter())


def trainer_step_clock(times: list[float]) -> Any:
    """The same for a transformers ``Trainer`` (TRL's included): a callback noting each step's
    end, so every contender's step times are taken at the same point."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())

    return Clock()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n matmul in ``dtype_name`` on this process's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    # Without native bf16 (avx512_bf16/AMX) a 2048^3 bf16 matmul takes a minute: grow n from 256
    # only while one product stays well inside the time budget, so the measurement is bounded.
    size = 256
    while True:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        start = time.perf_counter()
        torch.matmul(a, b)  # warm-up, and the estimate for the next size (8x the work)
        if size >= n or 8 * (time.perf_counter() - start) > seconds / 4:
            break
        size *= 2
    count = 0
    start = time.perf_counter()
    while True:
        torch.matmul(a, b)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2.0 * size**3 * count / elapsed


def model_shape(path: Path) -> dict[str, int]:
    """Sizes the FLOP count needs, read from the model's config.json."""
    cfg = json.loads((path / "config.json").read_text())
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    vocab = int(cfg["vocab_size"])
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    return {
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "attn_width": heads * head_dim,
        "non_embedding_params": per_layer * layers,
    }


def training_flops(
    shape: dict[str, int], real_tokens: int, label_tokens: int, attended_pairs: int
) -> float:
    """Model FLOPs of LoRA training steps (what the math needs, not what a kernel executes).

    - Frozen linear layers: forward 2N and the input-gradient 2N per token = 4 x non-embedding
      params x tokens (no weight gradient; the LoRA matrices add < 1%).
    - Attention scores and values: 4 x width FLOPs per attended (query, key) pair forward, twice
      that backward = 12 x width per pair per layer; causal within each document only.
    - LM head: 4 x vocab x hidden per token that carries a label (the loss needs no others).
    """
    linear = 4.0 * shape["non_embedding_params"] * real_tokens
    attention = 12.0 * shape["attn_width"] * shape["layers"] * attended_pairs
    head = 4.0 * shape["vocab"] * shape["hidden"] * label_tokens
    return linear + attention + head


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def machine() -> dict[str, Any]:
    flags: list[str] = []
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags") and not flags:
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    flags = [f for f in line.split(":", 1)[1].split() if f in wanted]
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "flags": flags,
        "load_avg_1m_at_start": round(load[0], 2),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def save_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(payload, indent=2, default=str))
    return path


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)
