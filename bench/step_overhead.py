"""Per-step time against dataset size: the host work of a step must not grow with the rows.

    python -m bench.step_overhead                          # 1k, 100k, 1M rows, 20 steps each
    python -m bench.step_overhead --rows 1000 100000 --steps 10

One ``LoraTrainer`` on the tiny test model (where host overhead shows most: the model's own work
is a few ms), set up once, then its rows replaced by synthetic datasets of each size with the same
row-length distribution, every row ``--length`` (96) tokens, so that every step of every size
computes the same and only the dataset size differs; each has a batch plan of its own. The sizes
take turns step by step (the machine's drift falls on all alike):
``--warmup`` untimed steps (the first draws the epoch's permutation), then ``--steps`` timed ones,
host batch preparation plus the optimizer step, as the training loop runs them. Medians of the
wall time and of the process CPU time (steadier on a shared machine), and of the host part alone.
The "before" column times what the replaced plan did per step at that size: three full
reshuffles of the epoch order in Python.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common


def synthetic_rows(count: int, length: int, seed: int = 0) -> Any:
    from worker.training import data as datamod

    rng = np.random.default_rng(seed)
    lengths = np.full(count, length, dtype=np.int64)
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = rng.integers(3, 500, total, dtype=np.int32)
    targets = np.where(rng.random(total) < 0.6, ids, datamod.IGNORE_INDEX).astype(np.int32)
    positions = (np.arange(total) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    return datamod.RowSet(ids, targets, positions, offsets)


def old_plan_seconds(count: int, calls: int = 3) -> float:
    """What the replaced ``BatchPlan.step_rows`` cost per step: ``calls`` full reshuffles."""
    start = time.perf_counter()
    for _ in range(calls):
        order = list(range(count))
        random.Random(1).shuffle(order)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96, help="tokens per row")
    args = parser.parse_args(argv)

    import torch

    from shared.spec import JobSpec
    from worker.tiny_models import make_tiny, sample_chat_rows
    from worker.training import data as datamod
    from worker.training.engine import LoraTrainer, TrainPaths

    torch.set_num_threads(1)  # the tiny model gains nothing from more; less noise
    work = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    model = make_tiny(work / "tiny")
    train = common.write_jsonl(work / "train.jsonl", sample_chat_rows(64))
    spec = JobSpec.model_validate(
        {
            "base_model": str(model),
            "training_file": str(train),
            "lora": common.LORA,
            "training": {"max_steps": 10**6, "batch_size": args.batch, "max_seq_length": 512},
        }
    )
    trainer = LoraTrainer(spec, TrainPaths(model=str(model), output_dir=work / "out"))
    trainer.setup()
    datasets = {count: synthetic_rows(count, args.length) for count in args.rows}
    plans = {count: datamod.BatchPlan(count, args.batch, 1, 1, seed=0) for count in args.rows}
    wall: dict[int, list[float]] = {count: [] for count in args.rows}
    cpu: dict[int, list[float]] = {count: [] for count in args.rows}
    host: dict[int, list[float]] = {count: [] for count in args.rows}
    # Sizes interleaved step by step, so the machine's drift falls on all of them alike.
    for step in range(args.warmup + args.steps):
        for count in args.rows:
            trainer.rows, trainer.plan = datasets[count], plans[count]
            start, start_cpu = time.perf_counter(), time.process_time()
            batch = trainer._host_step(step)
            prepared = time.perf_counter()
            trainer.train_step(step, batch)
            if step >= args.warmup:
                wall[count].append(time.perf_counter() - start)
                cpu[count].append(time.process_time() - start_cpu)
                host[count].append(prepared - start)
    first = args.rows[0]

    def median_ms(series: dict[int, list[float]], count: int) -> float:
        return statistics.median(series[count]) * 1000

    rows = [
        [
            f"{count:,}",
            f"{median_ms(wall, count):.1f}",
            f"{median_ms(cpu, count):.1f}",
            f"{median_ms(cpu, count) / median_ms(cpu, first):.3f}",
            f"{median_ms(host, count):.2f}",
            f"{old_plan_seconds(count) * 1000:.1f}",
        ]
        for count in args.rows
    ]
    print(common.machine())
    headers = [
        "rows",
        "step wall ms",
        "step CPU ms",
        f"CPU vs {first:,}",
        "host prep ms",
        "before: plan ms/step",
    ]
    print(common.table(headers, rows))
    best = {count: median_ms(cpu, count) / 1000 for count in args.rows}
    common.save_results(
        "step_overhead",
        {"machine": common.machine(), "args": vars(args), "step_seconds": best},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
