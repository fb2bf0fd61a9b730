"""The memory estimate against a real training run's peak memory on CPU.

A fresh Python process (so nothing else shares its heap) imports torch, notes its RSS, then
builds the engine on a small Llama (hidden 256, 4 layers, vocab 2048) and trains a few packed
steps of batch 8 x 256 tokens in fp32. Peak RSS (``VmHWM``) minus the RSS before the model was
loaded is what the job cost; ``shared.estimate`` must land within 30% of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.estimate import estimate
from shared.modelinfo import read_model_info
from shared.spec import JobSpec
from tests.worker.conftest import write_jsonl
from worker.tiny_models import make_tiny, sample_chat_rows

MEASURE = r"""
import json, sys
from pathlib import Path

import psutil, torch  # noqa: F401  (imported before the baseline: not the job's memory)
import peft, transformers  # noqa: F401

from shared.spec import JobSpec
from worker.training.engine import LoraTrainer, TrainPaths

torch.set_num_threads(2)
spec = JobSpec.model_validate_json(Path(sys.argv[1]).read_text())
base = psutil.Process().memory_info().rss
trainer = LoraTrainer(spec, TrainPaths(model=sys.argv[2], output_dir=Path(sys.argv[3])))
trainer.setup()
trainer.train()
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent's image
# across exec (a big pytest process would count as this job's memory).
status = Path("/proc/self/status").read_text()
hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
peak = int(hwm.split()[1]) * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def test_estimate_within_30_percent_of_measured_peak(tmp_path: Path) -> None:
    model = make_tiny(
        tmp_path / "m",
        hidden_size=256,
        layers=4,
        heads=8,
        kv_heads=4,
        intermediate=768,
        vocab_size=2048,
    )
    data = write_jsonl(tmp_path / "d.jsonl", sample_chat_rows(600))
    spec = JobSpec.model_validate(
        {
            "base_model": str(model),
            "training_file": str(data),
            "lora": {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 3, "batch_size": 8, "max_seq_length": 256},
        }
    )
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(tmp_path / "spec.json"),
            str(model),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    used = measured["peak"] - measured["base"]
    predicted = estimate(spec, read_model_info(model))["memory_bytes"]["total"]
    ratio = predicted / used
    print(f"estimate {predicted / 2**20:.1f} MiB, measured {used / 2**20:.1f} MiB, x{ratio:.2f}")
    assert 0.7 <= ratio <= 1.3, (predicted, used)
