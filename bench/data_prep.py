"""Data preparation: lorafleet's tokenise + mask + pack against ``datasets.map`` + a collator.

    python -m bench.data_prep                         # 10k, 100k and 1M chat rows
    python -m bench.data_prep --rows 10000 100000     # quicker

Both sides start from the same JSONL file of chat rows (``bench.common.bench_rows``: the engine
benchmark's data, 34-476 tokens a row) and the 5m benchmark model's tokenizer, whose chat template
marks the answers with ``{% generation %}``, so the peer gets its loss masks from transformers
itself. Each side runs in a fresh subprocess; peak memory is its VmHWM minus its RSS once the
libraries are imported.

- ``ours``: ``worker.training.datacache.prepare_rows`` into an empty cache folder: read and
  validate the file, render and tokenise (batched), mask the answers, truncate to 512, pack into
  rows of 512 (best-fit decreasing), write the arrays. What a job does once before training.
- ``peer``: ``datasets.load_dataset("json")`` then ``Dataset.map(batched=True)`` calling
  ``apply_chat_template(tokenize=True, return_assistant_tokens_mask=True, truncation=True,
  max_length=512)`` and turning the masks into labels, then every batch of 4 examples through
  transformers' ``DataCollatorWithFlattening`` (its packing: the examples of a batch in one row,
  positions restarting), as a Trainer's data loader would over one epoch.

Printed: seconds, microseconds per row, peak MiB, rows out, fill (real tokens per 512-token
row slot for ours; the peer's flattened rows are not capped, so its fill is not comparable), and
the ratio peer / ours of the time per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

SEQ = 512
PEER_BATCH = 4


def _memory_base() -> int:
    return common.rss_bytes()


def run_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    from worker.training import data as datamod
    from worker.training.datacache import prepare_rows
    from worker.training.model import load_tokenizer

    tokenizer = load_tokenizer(cfg["model"])
    base = _memory_base()
    start = time.perf_counter()
    prepared = prepare_rows(
        cfg["data"],
        tokenizer,
        max_seq_length=SEQ,
        packing=True,
        cache_dir=Path(cfg["work"]) / "cache",
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_bytes": common.peak_rss_bytes() - base,
        "rows_out": len(prepared.rows),
        "examples": prepared.stats.examples,
        "fill": datamod.fill_ratio(prepared.rows, SEQ),
    }


def run_peer(cfg: dict[str, Any]) -> dict[str, Any]:
    import datasets
    from transformers import DataCollatorWithFlattening

    from worker.training.data import IGNORE_INDEX
    from worker.training.model import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(cfg["model"])
    base = _memory_base()
    start = time.perf_counter()
    raw = datasets.load_dataset(
        "json", data_files=cfg["data"], split="train", cache_dir=str(Path(cfg["work"]) / "hf")
    )

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: Any = tokenizer.apply_chat_template(
            batch["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            truncation=True,
            max_length=SEQ,
        )
        labels = [
            [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)
        ]
        return {"input_ids": out["input_ids"], "labels": labels}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    collator = DataCollatorWithFlattening()
    rows = tokens = 0
    for batch in tokenized.iter(batch_size=PEER_BATCH):
        features = [
            {"input_ids": ids, "labels": labels}
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
        ]
        out = collator(features)
        rows += 1
        tokens += int(out["input_ids"].shape[1])
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_bytes": common.peak_rss_bytes() - base,
        "rows_out": rows,
        "examples": len(tokenized),
        "fill": None,
    }


def dataset(count: int) -> Path:
    path = common.REPO / "data" / "bench-data" / f"chat-{count}.jsonl"
    if not path.exists():
        rows = common.bench_rows(count)
        common.write_jsonl(path.with_suffix(".tmp"), rows)
        path.with_suffix(".tmp").rename(path)
    return path


def child(which: str, cfg: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.data_prep", "--child", which, json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=common.REPO,
        timeout=4 * 3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--only", choices=["ours", "peer"], help="run one side only")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        which, cfg = args.child[0], json.loads(args.child[1])
        runner = run_ours if which == "ours" else run_peer
        print(json.dumps(runner(cfg)))
        return 0
    model = common.model_dir("5m")
    sides = [args.only] if args.only else ["ours", "peer"]
    results: dict[str, dict[str, Any]] = {}
    table = []
    for count in args.rows:
        path = dataset(count)
        for side in sides:
            with tempfile.TemporaryDirectory(prefix="bench-prep-") as work:
                cfg = {"model": str(model), "data": str(path), "work": work}
                result = child(side, cfg)
            results[f"{side}-{count}"] = result
            fill = result["fill"]
            table.append(
                [
                    f"{count:,}",
                    side,
                    f"{result['seconds']:.1f}",
                    f"{result['seconds'] / count * 1e6:.0f}",
                    f"{result['peak_bytes'] / 2**20:.0f}",
                    f"{result['rows_out']:,}",
                    f"{fill:.3f}" if fill is not None else "-",
                ]
            )
            print(table[-1], flush=True)
    print(common.machine())
    headers = ["rows", "side", "seconds", "us/row", "peak MiB", "rows out", "fill"]
    print(common.table(headers, table))
    for count in args.rows:
        ours, peer = results.get(f"ours-{count}"), results.get(f"peer-{count}")
        if ours and peer:
            ratio = peer["seconds"] / ours["seconds"]
            print(f"{count:,} rows: time per row peer / ours = {ratio:.2f}")
    common.save_results("data_prep", {"machine": common.machine(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
