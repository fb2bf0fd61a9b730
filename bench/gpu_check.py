"""The engine on a real GPU, in one command: dtypes, attention kernel, syncs per step, memory.

    bash bench/gpu_check.sh                  # the whole check (device tests first), < 10 min
    python -m bench.gpu_check                # the engine part alone, 1 rank
    python -m bench.gpu_check --ranks 2      # 2 NCCL ranks (needs 2 GPUs)

One ``LoraTrainer`` run on a tiny Llama (hidden 256, 4 layers) with ``precision: auto`` (bf16
autocast on a GPU that has it), packed rows of 2 x 1024 tokens, as the engine runs jobs. It
checks and reports:

- dtypes: every frozen base weight in the autocast dtype, every LoRA weight fp32 (asserted);
- the attention kernel SDPA chose, from the kernel names in a profiler trace (flash,
  memory-efficient, cuDNN or math);
- host-device syncs per training step, from the same trace: CUDA runtime synchronisations
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, blocking
  ``cudaMemcpy``), device-to-host copies, and the aten ops that force one (``item``,
  ``_local_scalar_dense``, ``nonzero``...). The engine's budget is one: the loss all-reduce;
- peak CUDA memory (``torch.cuda.max_memory_allocated`` + the context) against
  ``shared.estimate`` for the same job and GPU.

The counting and the table are plain functions of a chrome trace, tested on CPU traces
(tests/worker/test_gpu_check.py); on CPU the script runs too (no CUDA rows) so it stays working.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import common

# aten ops whose output shape depends on the data: the host must wait for the device to learn it
# (boolean indexing is nonzero underneath). Scalar reads (``aten::item``) are counted apart: the
# optimizer reads its step counter, a CPU tensor, that way every step without touching the GPU.
SYNC_OPS = frozenset(
    {"aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::unique", "aten::_unique2"}
)
SCALAR_READS = frozenset({"aten::item"})
CUDA_SYNC_CALLS = frozenset(
    {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
)
KERNEL_FAMILIES = (
    ("flash", ("flash",)),
    ("memory-efficient", ("fmha", "efficient_attention", "mem_eff")),
    ("cudnn", ("cudnn",)),
)


def step_windows(events: Iterable[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step number, start, end) of every ``ProfilerStep#N`` span of a chrome trace."""
    windows = []
    for event in events:
        name = str(event.get("name", ""))
        if name.startswith("ProfilerStep#") and "dur" in event:
            start = float(event["ts"])
            windows.append((int(name.split("#")[1]), start, start + float(event["dur"])))
    return sorted(windows)


def syncs_per_step(trace: dict[str, Any]) -> list[dict[str, int]]:
    """Per profiled step: CUDA sync calls, device-to-host copies, data-dependent-shape aten ops
    and scalar reads."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    out = []
    for step, start, end in step_windows(events):
        counts = {
            "step": step,
            "cuda_sync_calls": 0,
            "dtoh_copies": 0,
            "sync_ops": 0,
            "scalar_reads": 0,
        }
        for event in events:
            ts = float(event.get("ts", -1))
            if not start <= ts < end:
                continue
            name, category = str(event.get("name", "")), str(event.get("cat", ""))
            if category == "cuda_runtime" and name in CUDA_SYNC_CALLS:
                counts["cuda_sync_calls"] += 1
            elif category == "gpu_memcpy" and "DtoH" in name:
                counts["dtoh_copies"] += 1
            elif category == "cpu_op" and name in SYNC_OPS:
                counts["sync_ops"] += 1
            elif category == "cpu_op" and name in SCALAR_READS:
                counts["scalar_reads"] += 1
        out.append(counts)
    return out


def attention_kernels(trace: dict[str, Any]) -> list[str]:
    """The SDPA kernel families that ran, from GPU kernel names and the CPU-side aten op names
    (``aten::_scaled_dot_product_flash_attention``...); ["math"] when SDPA ran none of them."""
    names = set()
    sdpa = False
    for event in trace.get("traceEvents", []):
        name = str(event.get("name", "")).lower()
        if event.get("cat") == "kernel" or "scaled_dot_product" in name:
            names.add(name)
        sdpa = sdpa or "scaled_dot_product" in name
    found = [
        family for family, marks in KERNEL_FAMILIES if any(m in n for n in names for m in marks)
    ]
    return found or (["math"] if sdpa else [])


def summary_table(checks: list[tuple[str, str, bool | None]]) -> str:
    """One table: check, value, verdict (PASS / FAIL / info)."""
    rows = [
        [name, value, "info" if ok is None else ("PASS" if ok else "FAIL")]
        for name, value, ok in checks
    ]
    return common.table(["check", "value", "result"], rows)


# --------------------------------------------------------------------------- the engine run
def engine_run(work: Path, steps: int = 6) -> list[tuple[str, str, bool | None]]:
    """Train a tiny job under the profiler; return the summary checks (rank 0)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from shared.estimate import estimate
    from shared.modelinfo import read_model_info
    from shared.spec import JobSpec
    from worker.tiny_models import make_tiny
    from worker.training.engine import DistInfo, LoraTrainer, TrainPaths

    info = DistInfo.from_env()
    model = work / "model"
    if info.is_main and not (model / "model.safetensors").exists():
        make_tiny(model, hidden_size=256, layers=4, heads=8, kv_heads=4, intermediate=640)
    data = work / "data.jsonl"
    if info.is_main and not data.exists():
        common.write_jsonl(data, common.bench_rows(400))
    while not (model / "model.safetensors").exists() or not data.exists():
        import time

        time.sleep(0.2)
    spec = JobSpec.model_validate(
        {
            "base_model": str(model),
            "training_file": str(data),
            "lora": common.LORA,
            "training": {"max_steps": steps + 4, "batch_size": 2, "max_seq_length": 1024},
        }
    )
    trainer = LoraTrainer(
        spec,
        TrainPaths(model=str(model), output_dir=work / f"out{info.rank}"),
        dist_info=info,
    )
    trainer.setup()
    cuda = trainer.device.type == "cuda"
    checks: list[tuple[str, str, bool | None]] = [
        ("device", f"{trainer.device} x {info.world_size}", None),
        ("precision", str(trainer.autocast_dtype or torch.float32), None),
    ]
    base_dtypes = {
        str(p.dtype) for n, p in trainer.peft_model.named_parameters() if "lora_" not in n
    }
    lora_dtypes = {str(p.dtype) for n, p in trainer.peft_model.named_parameters() if "lora_" in n}
    expected_base = str(
        trainer.autocast_dtype if cuda and trainer.autocast_dtype else torch.float32
    )
    checks.append(("base weights", ",".join(sorted(base_dtypes)), base_dtypes == {expected_base}))
    checks.append(("LoRA weights", ",".join(sorted(lora_dtypes)), lora_dtypes == {"torch.float32"}))
    checks.append(("attention", "segments" if trainer.packed_attention else "mask", None))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(2):  # warm-up: allocator, kernels, cuDNN heuristics
        trainer.train_step(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trace_path = work / f"trace{info.rank}.json"
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=steps - 1, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace_path)),
    ) as p:
        for step in range(2, 2 + steps):
            trainer.train_step(step)
            p.step()
    trace = json.loads(trace_path.read_text())
    per_step = syncs_per_step(trace)
    if len(per_step) != steps - 1:
        raise RuntimeError(f"the trace holds {len(per_step)} profiled steps, not {steps - 1}")
    worst = max(s["cuda_sync_calls"] if cuda else s["sync_ops"] for s in per_step)
    checks.append(("SDPA kernel", ",".join(attention_kernels(trace)) or "-", None))
    checks.append(
        (
            "syncs per step (max)",
            f"{worst} ({'CUDA sync calls' if cuda else 'sync-forcing ops'}); "
            f"DtoH copies {max((s['dtoh_copies'] for s in per_step), default=0)}",
            worst <= (1 if cuda else 0),
        )
    )
    if cuda:
        props = torch.cuda.get_device_properties(trainer.device)
        peak = torch.cuda.max_memory_allocated(trainer.device)
        predicted = estimate(
            spec,
            read_model_info(model),
            info.world_size,
            int(props.total_memory),
            gpu_type=props.name,
        )["memory_bytes"]
        context = predicted["total"] - predicted["overhead"]  # the estimate without its slack
        ratio = predicted["total"] / max(peak, 1)
        checks.append(
            (
                "peak CUDA memory vs estimate",
                f"{peak / 2**20:.0f} MiB measured, {predicted['total'] / 2**20:.0f} MiB "
                f"estimated ({context / 2**20:.0f} MiB before slack), x{ratio:.2f}",
                ratio >= 1.0,
            )
        )
    trainer.cleanup()
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.ranks > 1 and "RANK" not in os.environ:
        # Re-run this module as N ranks through the engine's own launcher environment.
        import subprocess

        port = common_free_port()
        procs = []
        for rank in range(args.ranks):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(args.ranks),
                "LOCAL_WORLD_SIZE": str(args.ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            command = [sys.executable, "-m", "bench.gpu_check", "--work", str(work)]
            command += ["--steps", str(args.steps)]
            procs.append(subprocess.Popen(command, env=env))
        return max(p.wait() for p in procs)
    checks = engine_run(work, args.steps)
    if os.environ.get("RANK", "0") == "0":
        print(summary_table(checks))
        (work / "summary.json").write_text(json.dumps(checks))
    return 0 if all(ok is not False for _, _, ok in checks) else 1


def common_free_port() -> int:
    from worker.training.launch import free_port

    return free_port()


if __name__ == "__main__":
    raise SystemExit(main())
