"""bench/gpu_check.py's CPU-testable parts: sync counting and the summary on real CPU traces.

On a GPU the check counts CUDA runtime synchronisations per step; on CPU the same code counts the
aten ops that would force one (data-dependent shapes: ``nonzero``, ``masked_select``...). An
engine step must have none: its target positions and segment layout come from the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench import gpu_check


def _trace(tmp_path: Path, body, steps: int = 3) -> dict:  # type: ignore[no-untyped-def]
    path = tmp_path / "trace.json"
    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(wait=0, warmup=0, active=steps, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(path)),
    ) as prof:
        for step in range(steps):
            body(step)
            prof.step()
    return json.loads(path.read_text())


def test_counts_data_dependent_ops_per_step(tmp_path: Path) -> None:
    x = torch.arange(20.0)

    def body(step: int) -> None:
        for _ in range(step):  # step N does N boolean indexings and one scalar read
            x[x > 3].sum()
        x.sum().item()

    counts = gpu_check.syncs_per_step(_trace(tmp_path, body))
    assert [c["sync_ops"] for c in counts] == [0, 1, 2]
    assert all(c["scalar_reads"] == 1 and c["cuda_sync_calls"] == 0 for c in counts)


def test_synthetic_cuda_events_are_counted() -> None:
    """The CUDA side of the counter on the event shapes Kineto writes (no GPU here to record)."""
    trace = {
        "traceEvents": [
            {"ph": "X", "name": "ProfilerStep#5", "cat": "user_annotation", "ts": 0, "dur": 100},
            {"ph": "X", "name": "cudaStreamSynchronize", "cat": "cuda_runtime", "ts": 10},
            {"ph": "X", "name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 11},
            {"ph": "X", "name": "Memcpy DtoH (Device -> Pageable)", "cat": "gpu_memcpy", "ts": 12},
            {"ph": "X", "name": "Memcpy HtoD (Pinned -> Device)", "cat": "gpu_memcpy", "ts": 13},
            {"ph": "X", "name": "cudaStreamSynchronize", "cat": "cuda_runtime", "ts": 150},
            {"ph": "X", "name": "flash_fwd_kernel", "cat": "kernel", "ts": 20},
        ]
    }
    (step,) = gpu_check.syncs_per_step(trace)
    assert (step["step"], step["cuda_sync_calls"], step["dtoh_copies"]) == (5, 1, 1)
    assert gpu_check.attention_kernels(trace) == ["flash"]


def test_engine_run_on_cpu_has_no_sync_forcing_op(tmp_path: Path) -> None:
    checks = gpu_check.engine_run(tmp_path, steps=3)
    by_name = {name: (value, ok) for name, value, ok in checks}
    assert by_name["syncs per step (max)"][1] is True, by_name
    assert by_name["base weights"] == ("torch.float32", True)
    assert by_name["LoRA weights"] == ("torch.float32", True)
    assert by_name["SDPA kernel"][0] == "flash"  # CPU SDPA's flash kernel, from the op names
    table = gpu_check.summary_table(checks)
    assert "syncs per step (max)" in table and "FAIL" not in table
