"""Long packed rows cost memory linear in their length: no sequence x sequence tensor in a step.

transformers builds a ``batch x seq^2`` block-diagonal mask for packed rows before any attention
runs; with segment attention the engine switches that off (worker/training/attention.py). Checked
two ways: every tensor any op produces during a forward and backward is recorded (a dispatch
mode sees them all) and none reaches seq^2 / 4 elements, while the mask path does produce a
seq^2 one (so the check can fail); and a real training step at 1 x 8192 and 1 x 16384 tokens, in
fresh processes, grows its peak memory about 2x, in line with the estimate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shared.estimate import estimate
from shared.modelinfo import read_model_info
from shared.spec import JobSpec, LoraSettings
from tests.worker.conftest import write_jsonl
from worker.tiny_models import make_tiny
from worker.training.attention import build_layout, use_packed_attention
from worker.training.model import CausalLMLoss, apply_lora, load_base_model

REPO = Path(__file__).resolve().parents[2]


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else (out,):
            if isinstance(item, torch.Tensor) and item.numel() > self.largest:
                self.largest, self.op = item.numel(), str(func)
        return out


def _largest_in_step(model_dir: Path, seq: int, segments: bool) -> tuple[int, str]:
    base = load_base_model(str(model_dir))
    assert use_packed_attention(base, seq) is True
    if not segments:
        base.set_attn_implementation("sdpa")
    lora = LoraSettings(r=4, dropout=0.1, target_modules=["q_proj", "v_proj"])
    loss_fn = CausalLMLoss(apply_lora(base, lora))
    docs = [seq // 4, seq // 4, seq // 2 - 8]  # three documents and 8 tokens of padding
    positions = torch.tensor([[p for n in docs for p in range(n)] + list(range(8))])
    ids = torch.randint(3, 500, (1, seq))
    targets = ids.roll(-1, 1)
    kwargs: dict[str, Any] = {"position_ids": positions}
    if segments:
        kwargs["layout"] = build_layout(positions, torch.device("cpu"))
    with LargestTensor() as seen:
        total, _ = loss_fn(ids, targets, **kwargs)
        total.backward()
    return seen.largest, seen.op


def test_no_sequence_squared_tensor_with_segment_attention(tiny_model: Path) -> None:
    seq = 2048
    largest, op = _largest_in_step(tiny_model, seq, segments=True)
    assert largest < seq * seq // 4, (largest, op)
    masked, _ = _largest_in_step(tiny_model, seq, segments=False)
    assert masked >= seq * seq  # the block-diagonal mask transformers builds otherwise


MEASURE = r"""
import json, sys
from pathlib import Path

import psutil, torch  # noqa: F401  (imported before the baseline: not the job's memory)
import peft, transformers  # noqa: F401

from shared.spec import JobSpec
from worker.training.engine import LoraTrainer, TrainPaths

torch.set_num_threads(2)
spec = JobSpec.model_validate_json(Path(sys.argv[1]).read_text())
trainer = LoraTrainer(spec, TrainPaths(model=sys.argv[2], output_dir=Path(sys.argv[3])))
base = psutil.Process().memory_info().rss
trainer.setup()
trainer.train()
status = Path("/proc/self/status").read_text()
hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": int(hwm.split()[1]) * 1024}))
"""


@pytest.mark.slow
def test_peak_memory_grows_linearly_with_row_length(tmp_path: Path) -> None:
    model = make_tiny(tmp_path / "m", hidden_size=128, layers=2, intermediate=320)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "runs",
        "far",
        "away",
    ]
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(600))} for i in range(64)]
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    used = {}
    for seq in (8192, 16384):
        spec = JobSpec.model_validate(
            {
                "base_model": str(model),
                "training_file": str(train),
                "lora": {"r": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
                "training": {"max_steps": 2, "batch_size": 1, "max_seq_length": seq},
            }
        )
        spec_path = tmp_path / f"spec{seq}.json"
        spec_path.write_text(spec.model_dump_json())
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, str(spec_path), str(model), str(tmp_path / f"o{seq}")],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        used[seq] = measured["peak"] - measured["base"]
        predicted = estimate(spec, read_model_info(model))["memory_bytes"]["total"]
        ratio = predicted / used[seq]
        print(f"{seq}: measured {used[seq] / 2**20:.0f} MiB, estimate {predicted / 2**20:.0f} MiB")
        assert 0.75 <= ratio <= 1.25, (seq, predicted, used[seq])
    growth = used[16384] / used[8192]
    print(f"growth 8192 -> 16384: x{growth:.2f}")
    assert growth < 2.4, used  # a seq^2 mask (256 MiB at 16384) would make it ~3x
