"""Per-rank memory and throughput of FSDP2 against DDP: what sharding saves and what it costs.

    .venv/bin/python -m bench.fsdp_memory                     # 40m and deep (~120M), fp32, CPU
    .venv/bin/python -m bench.fsdp_memory --size 40m --steps 3     # quick look

Three runs of the engine per model, each rank with the same batch (``--batch`` rows of ``--seq``
tokens per micro-step, so activations are alike on every rank of every run) and data: 1 DDP rank
(the replica alone), 2 DDP ranks and 2 FSDP ranks (the same work, sharded). Each rank is a fresh
interpreter running ``LoraTrainer`` with launch.py's environment (RANK, WORLD_SIZE, ...). Every
configuration runs twice: a memory pass of 2 steps with ``MALLOC_MMAP_THRESHOLD_`` at 128 KiB, so
that glibc returns a freed tensor's pages at once and RSS follows the live tensors rather than
the allocator's cache (FSDP frees and re-allocates every gathered layer twice per step; without
it the FSDP ranks' RSS showed ~100 MB of cache on the 40m model), and speed passes of ``--steps``
with the default allocator (the threshold costs a page fault per large allocation), every
configuration once per round, best of ``--repeats`` rounds. Each rank
reports (memory pass):

- **base MB**: the frozen base's parameter bytes this rank holds between steps (the local shard of
  every frozen parameter under FSDP); **adapter MB**: the trainable LoRA parameters' bytes.
- **setup MB**: RSS after ``setup()`` minus RSS before it (the runtime's own ~0.5 GB subtracted):
  what the model, its adapters and the data cost this rank once training can start. Rank 0 of FSDP
  reads the whole base once while loading (its copy is dropped before the first step), which
  **setup peak MB** (VmHWM minus the same start) shows.
- **train peak MB**: the peak RSS during the training steps (VmHWM reset after setup through
  ``/proc/self/clear_refs``) minus the RSS before setup: the base held, the gathered layers, the
  activations of one rank's rows, the optimizer.
- **tok/s** (speed pass): real tokens of the whole job per second after ``--warmup`` untimed
  steps.

Ratios printed: FSDP rank / DDP replica for base MB (the frozen base must shrink about by the rank
count) and for the training peak; tokens/s of 2 FSDP ranks against 2 DDP ranks (the cost of
sharding at equal work and parallelism). On these CPU machines the ranks share the cores (threads
are split between them) and the host's RAM: tokens/s compares configurations, not hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from worker.training.launch import free_port

# A model with the 40m's width and three times its layers: the frozen base dominates more, and
# the part FSDP keeps gathered (two layers and the root) is a smaller share of it.
DEEP = {
    "hidden_size": 512,
    "layers": 36,
    "heads": 8,
    "kv_heads": 4,
    "intermediate": 1536,
    "vocab_size": 4096,
}
RUNS = (("ddp x1", "ddp", 1), ("ddp x2", "ddp", 2), ("fsdp x2", "fsdp", 2))


def model_dir(size: str) -> Path:
    if size != "deep":
        return common.model_dir(size)
    from worker.tiny_models import make_tiny

    folder = common.CACHE / "tiny-deep"
    if not (folder / "model.safetensors").exists():
        make_tiny(folder, **DEEP)  # type: ignore[arg-type]
    return folder


# --------------------------------------------------------------------------- rank (child)


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def rank_main(cfg_path: str, result_dir: str) -> int:
    import torch
    from torch.distributed.tensor import DTensor

    from shared.spec import JobSpec
    from worker.training.engine import DistInfo, LoraTrainer, TrainPaths

    cfg = json.loads(Path(cfg_path).read_text())
    info = DistInfo.from_env()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // info.world_size))
    spec = JobSpec.model_validate(
        {
            "base_model": cfg["model"],
            "training_file": cfg["data"],
            "lora": common.LORA,
            "training": {
                "max_steps": cfg["steps"],
                "batch_size": cfg["batch"],
                "learning_rate": 2e-4,
                "max_seq_length": cfg["seq"],
                "precision": "fp32",
                "strategy": cfg["strategy"],
                "seed": 0,
            },
        }
    )
    times: list[float] = []
    out = Path(tempfile.mkdtemp(prefix=f"bench-fsdp-{info.rank}-"))
    trainer = LoraTrainer(
        spec,
        TrainPaths(model=cfg["model"], output_dir=out, cache_dir=Path(cfg["cache"])),
        sink=common.StepClock(times),
        dist_info=info,
    )
    rss_start = common.rss_bytes()
    trainer.setup()
    rss_setup, setup_peak = common.rss_bytes(), common.peak_rss_bytes()
    held = {True: 0, False: 0}
    for param in trainer.peft_model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        held[param.requires_grad] += local.numel() * local.element_size()
    resettable = _reset_peak()
    trainer.train()
    train_peak = common.peak_rss_bytes()
    real = [
        int(trainer.rows.real_tokens[trainer.plan.step_rows(s)].sum())
        for s in range(trainer.total_steps)
    ]
    result = {
        "rank": info.rank,
        "strategy": trainer.strategy,
        "base_bytes": held[False],
        "adapter_bytes": held[True],
        "setup_bytes": rss_setup - rss_start,
        "setup_peak_bytes": setup_peak - rss_start,
        "train_peak_bytes": (train_peak - rss_start) if resettable else None,
        "step_end": times,
        "real_tokens": real,
        "final_loss": trainer.train_loss,
    }
    (Path(result_dir) / f"rank{info.rank}.json").write_text(json.dumps(result))
    trainer.cleanup()
    sys.stdout.flush()
    os._exit(0)


# --------------------------------------------------------------------------- parent
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run(
    cfg: dict[str, Any], nproc: int, timeout: float, extra_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One configuration over ``nproc`` fresh rank processes; their reports, by rank."""
    work = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    (work / "cfg.json").write_text(json.dumps(cfg))
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TOKENIZERS_PARALLELISM": "false",
            **(extra_env or {}),
        }
        log = open(work / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed by the child's exit)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.fsdp_memory", "--rank", str(work / "cfg.json")]
                + [str(work)],
                cwd=common.REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    reports = []
    for rank, proc in enumerate(procs):
        result = work / f"rank{rank}.json"
        if proc.returncode != 0 or not result.exists():
            tail = (work / f"rank{rank}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"rank {rank} failed (exit {proc.returncode}):\n{tail}")
        reports.append(json.loads(result.read_text()))
    return reports


def tokens_per_s(rank0: dict[str, Any], warmup: int) -> float:
    ends, real = rank0["step_end"], rank0["real_tokens"]
    first = min(warmup, len(ends) - 1)
    return sum(real[first + 1 : len(ends)]) / max(1e-9, ends[-1] - ends[first])


def run_size(size: str, args: argparse.Namespace) -> dict[str, Any]:
    model = model_dir(size)
    seq = args.seq or (512 if size == "40m" else 256)
    data = common.write_jsonl(
        common.REPO / "data" / "bench-data" / f"rows-{args.rows}.jsonl",
        common.bench_rows(args.rows),
    )
    cache = Path(tempfile.mkdtemp(prefix="bench-fsdp-cache-"))
    base = {
        "model": str(model),
        "data": str(data),
        "cache": str(cache),
        "steps": args.steps,
        "batch": args.batch,
        "seq": seq,
    }
    runs: dict[str, dict[str, Any]] = {}
    for name, strategy, nproc in RUNS:
        print(f"[bench] {size} {name}: memory ...", file=sys.stderr, flush=True)
        reports = run({**base, "strategy": strategy, "steps": 2}, nproc, args.timeout, MEMORY_ENV)
        assert all(r["strategy"] == strategy for r in reports), reports
        runs[name] = {"ranks": reports, "batch": args.batch, "tokens_per_s": 0.0}
    # Speed: every configuration once per round, the best round kept (noise on a shared
    # machine only ever slows a run down).
    for round_no in range(args.repeats):
        for name, strategy, nproc in RUNS:
            tag = f"{size} {name}: speed (round {round_no + 1}/{args.repeats})"
            print(f"[bench] {tag} ...", file=sys.stderr, flush=True)
            timed = run({**base, "strategy": strategy}, nproc, args.timeout)
            speed = tokens_per_s(timed[0], args.warmup)
            if speed > runs[name]["tokens_per_s"]:
                runs[name]["tokens_per_s"] = speed
                runs[name]["final_loss"] = timed[0]["final_loss"]
    replica, fsdp = runs["ddp x1"]["ranks"][0], runs["fsdp x2"]["ranks"]
    peaks = [r["train_peak_bytes"] for r in fsdp]
    fsdp_tps: float = runs["fsdp x2"]["tokens_per_s"]
    ddp_tps: float = runs["ddp x2"]["tokens_per_s"]
    ratios = {
        "base_fsdp_rank_vs_replica": max(r["base_bytes"] for r in fsdp) / replica["base_bytes"],
        "train_peak_fsdp_rank_vs_replica": (max(peaks) / replica["train_peak_bytes"])
        if None not in peaks and replica["train_peak_bytes"]
        else None,
        "tokens_per_s_fsdp2_vs_ddp2": fsdp_tps / ddp_tps,
    }
    shape = common.model_shape(model)
    return {"size": size, "seq": seq, "model": shape, "runs": runs, "ratios": ratios}


def report(result: dict[str, Any]) -> str:
    mb = 2**20
    rows = []
    for name, run_ in result["runs"].items():
        for r in run_["ranks"]:
            rows.append(
                [
                    name,
                    str(r["rank"]),
                    f"{r['base_bytes'] / mb:,.1f}",
                    f"{r['adapter_bytes'] / mb:,.2f}",
                    f"{r['setup_bytes'] / mb:,.0f}",
                    f"{r['setup_peak_bytes'] / mb:,.0f}",
                    f"{r['train_peak_bytes'] / mb:,.0f}" if r["train_peak_bytes"] else "-",
                    f"{run_['tokens_per_s']:,.0f}" if r["rank"] == 0 else "",
                ]
            )
    headers = [
        "run",
        "rank",
        "base MB",
        "adapter MB",
        "setup MB",
        "setup peak MB",
        "train peak MB",
        "tok/s",
    ]
    ratios = result["ratios"]
    lines = [
        f"model {result['size']} ({result['seq']} tokens x {result['runs']['ddp x1']['batch']} "
        f"rows per rank): {result['model']}",
        common.table(headers, rows),
        f"  frozen base per FSDP rank / replica: {ratios['base_fsdp_rank_vs_replica']:.3f}",
    ]
    if ratios["train_peak_fsdp_rank_vs_replica"] is not None:
        lines.append(
            f"  train peak per FSDP rank / replica: {ratios['train_peak_fsdp_rank_vs_replica']:.3f}"
        )
    lines.append(f"  tokens/s fsdp x2 / ddp x2: {ratios['tokens_per_s_fsdp2_vs_ddp2']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=["40m", "deep", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--seq", type=int, default=0, help="tokens per row (0: 512 / deep 256)")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank per step")
    parser.add_argument("--rows", type=int, default=1200, help="dataset rows")
    parser.add_argument("--repeats", type=int, default=2, help="speed rounds; best kept")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--rank", nargs=2, metavar=("CFG", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank:
        return rank_main(*args.rank)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    info = {**common.machine(), **common.versions()}
    print(f"[bench] {json.dumps(info)}", file=sys.stderr, flush=True)
    sizes = ["40m", "deep"] if args.size == "both" else [args.size]
    results = []
    for size in sizes:
        result = run_size(size, args)
        print(report(result), flush=True)
        results.append(result)
    path = common.save_results(
        "fsdp_memory", {"machine": info, "args": vars(args), "sizes": results}
    )
    print(f"[bench] results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
