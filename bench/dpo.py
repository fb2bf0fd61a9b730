"""DPO benchmark: lorafleet's DPO against TRL's ``DPOTrainer`` + peft on the same pairs and model.

    python -m bench.dpo                          # 5m model, fp32, 8 steps (2 untimed)
    python -m bench.dpo --size 40m --steps 6     # the larger model
    python -m bench.dpo --peer plain             # against a plain unpacked peft DPO loop instead
    python -m bench.dpo --peer both --repeats 2  # both peers, best of 2 rounds each

Each contender runs in its own subprocess (``--child``) so its peak RSS (VmHWM) is its own.

Contenders (same model, pairs, LoRA r/alpha/targets with dropout 0 (TRL disables dropout by
default), beta 0.1, lr 2e-4 cosine with 3% warm-up, AdamW, clipping 1.0, fp32, all cores):
- ``ours``: ``LoraTrainer`` with ``method.type`` dpo: rows of ``2 x --seq`` tokens holding whole
  pairs (chosen and rejected side by side), segment attention, fused head, reference forward with
  the adapter disabled in every step.
- ``ours-precompute``: the same with ``dpo.precompute_reference`` (the one-off reference pass is
  reported apart, not in tok/s).
- ``trl``: TRL's ``DPOTrainer`` with a peft ``LoraConfig`` (its reference: the adapter disabled),
  ``per_device_train_batch_size`` = ``ours``' mean pairs per step, so both train as many pairs
  per step; chosen and rejected padded to the longest sequence of the batch.
- ``plain`` (``--peer plain``, or when TRL is not installed): what a user writes by hand with
  transformers + peft: the same batches padded, full logits, reference under ``disable_adapter()``.

tok/s counts real (non-pad) tokens of both answers, prompt included, each contender its own
tokenisation. MB/ktok is peak RSS per 1000 real tokens per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

LORA = {**common.LORA, "dropout": 0.0}
BETA = 0.1
LR = 2e-4


def bench_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs of realistic length spread: each prompt of ``bench_rows`` with its own
    answer chosen and another row's answer rejected (string rows, TRL's standard format)."""
    rows = common.bench_rows(n, seed)
    rng = random.Random(seed + 1)
    pairs = []
    for row in rows:
        messages = row["messages"]
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1]) + "\nassistant:"
        other = rows[rng.randrange(len(rows))]["messages"][-1]["content"]
        pairs.append(
            {"prompt": prompt, "chosen": " " + messages[-1]["content"], "rejected": " " + other}
        )
    return pairs


def run_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from shared.spec import JobSpec
    from worker.training import events
    from worker.training.engine import LoraTrainer, TrainPaths

    torch.set_num_threads(cfg["threads"])
    spec = JobSpec.model_validate(
        {
            "base_model": cfg["model"],
            "training_file": cfg["data"],
            "method": {
                "type": "dpo",
                "dpo": {"beta": BETA, "precompute_reference": cfg.get("precompute", False)},
            },
            "lora": LORA,
            "training": {
                "max_steps": cfg["steps"],
                "batch_size": cfg["batch"],
                "learning_rate": LR,
                "max_seq_length": cfg["seq"],
                "packing": cfg.get("packing", True),
                "precision": "fp32",
                "seed": 0,
            },
        }
    )
    times: list[float] = []
    clock = common.StepClock(times)
    trainer = LoraTrainer(
        spec,
        TrainPaths(model=cfg["model"], output_dir=Path(tempfile.mkdtemp(prefix="bench-dpo-"))),
        sink=clock,
    )
    trainer.setup()
    precompute = [
        r.data.get("seconds")
        for r in clock.records
        if isinstance(r, events.Event) and r.data and "precomputed" in r.message
    ]
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    trainer.train()
    steps = trainer.total_steps
    real, padded, pairs = [], [], []
    for step in range(steps):
        rows = trainer.plan.step_rows(step)
        real.append(int(trainer.rows.real_tokens[rows].sum()))
        padded.append(int(trainer.rows.real_tokens[rows].max()) * len(rows))
        pairs.append(int(trainer.rows.pair_counts[rows].sum()))
    return {
        "start": start,
        "step_end": times[:steps],
        "real_tokens": real,
        "padded_tokens": padded,
        "pairs": pairs,
        "rss_before_train": rss_before,
        "final_loss": trainer.train_loss,
        "precompute_seconds": precompute[0] if precompute else None,
    }


def _pair_dataset(cfg: dict[str, Any]) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(cfg["data"]).read_text().splitlines()]


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from worker.training.model import load_tokenizer

    torch.set_num_threads(cfg["threads"])
    tokenizer = load_tokenizer(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    model.config.use_cache = False
    batches: list[dict[str, int]] = []
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=cfg["seq"])

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(examples)
        mask = batch["attention_mask"]
        batches.append({"real": int(mask.sum()), "padded": int(mask.numel())})
        return batch

    times: list[float] = []

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"],
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.03 * cfg["steps"]),
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        max_length=cfg["seq"],
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_pair_dataset(cfg)),
        processing_class=tokenizer,
        data_collator=collate,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
        callbacks=[common.trainer_step_clock(times)],
    )
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    result = trainer.train()
    used = batches[: cfg["steps"]]
    return {
        "start": start,
        "step_end": times[: cfg["steps"]],
        "real_tokens": [b["real"] for b in used],
        "padded_tokens": [b["padded"] for b in used],
        "pairs": [cfg["batch"]] * len(used),
        "rss_before_train": rss_before,
        "final_loss": float(result.training_loss),
        "precompute_seconds": None,
    }


def run_plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """A straightforward peft DPO loop: batches of pairs padded to the longest sequence."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    from shared.datasets import load_examples
    from worker.training import data as datamod
    from worker.training.model import load_tokenizer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg["model"])
    tokenized, _ = datamod.tokenize_examples(tokenizer, load_examples(cfg["data"]), cfg["seq"])
    sequences = [
        (
            tokenized.input_ids[tokenized.offsets[i] : tokenized.offsets[i + 1]],
            tokenized.targets[tokenized.offsets[i] : tokenized.offsets[i + 1]],
        )
        for i in range(len(tokenized))
    ]
    base = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    base.config.use_cache = False
    model: Any = get_peft_model(
        base,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine", optimizer, math.ceil(0.03 * cfg["steps"]), num_training_steps=cfg["steps"]
    )
    pairs = len(sequences) // 2
    order = random.Random(0).sample(range(pairs), pairs)
    times: list[float] = []
    real: list[int] = []
    padded: list[int] = []
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(cfg["steps"]):
        chosen = order[(step * cfg["batch"]) % pairs :][: cfg["batch"]]
        members = [sequences[2 * p + side] for side in (0, 1) for p in chosen]
        width = max(len(ids) for ids, _ in members)
        ids = torch.full((len(members), width), tokenizer.pad_token_id, dtype=torch.long)
        targets = torch.full((len(members), width), datamod.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for r, (row_ids, row_targets) in enumerate(members):
            ids[r, : len(row_ids)] = torch.from_numpy(row_ids.astype("int64"))
            targets[r, : len(row_ids)] = torch.from_numpy(row_targets.astype("int64"))
            mask[r, : len(row_ids)] = 1
        real.append(int(mask.sum()))
        padded.append(int(mask.numel()))

        with torch.no_grad(), model.disable_adapter():
            reference = _sequence_logps(model, ids, mask, targets)
        policy = _sequence_logps(model, ids, mask, targets)
        ratios = (policy - reference).view(2, -1)
        loss = -F.logsigmoid(BETA * (ratios[0] - ratios[1])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return {
        "start": start,
        "step_end": times,
        "real_tokens": real,
        "padded_tokens": padded,
        "pairs": [cfg["batch"]] * cfg["steps"],
        "rss_before_train": rss_before,
        "final_loss": float(loss),
        "precompute_seconds": None,
    }


def _sequence_logps(model: Any, ids: Any, mask: Any, targets: Any) -> Any:
    """Summed log-probabilities of each row's targets, from full-vocabulary logits."""
    import torch.nn.functional as F

    from worker.training.data import IGNORE_INDEX

    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    picked = F.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE_INDEX)).sum(1)


RUNNERS = {"ours": run_ours, "ours-precompute": run_ours, "trl": run_trl, "plain": run_plain}


def child_main(name: str, cfg_path: str, result_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    result = RUNNERS[name](cfg)
    result["peak_rss"] = common.peak_rss_bytes()
    Path(result_path).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def spawn(name: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-dpo-{name}-"))
    (work / "cfg.json").write_text(json.dumps(cfg))
    result = work / "result.json"
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(cfg["threads"]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dpo", "--child", name, str(work / "cfg.json"), str(result)],
        cwd=common.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(result.read_text()))


def _speed(raw: dict[str, Any], warmup: int) -> float:
    return float(summarise({**raw, "peak_rss": 0}, warmup)["tokens_per_s"])


def summarise(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    ends = raw["step_end"]
    first = min(warmup, len(ends) - 1)
    t0 = ends[first - 1] if first > 0 else raw["start"]
    elapsed = ends[-1] - t0
    real = sum(raw["real_tokens"][first:])
    per_step = statistics.mean(raw["real_tokens"])
    padded = sum(raw["padded_tokens"])
    return {
        "tokens_per_s": real / elapsed,
        "pairs_per_s": sum(raw["pairs"][first:]) / elapsed,
        "seconds_per_step": elapsed / (len(ends) - first),
        "tokens_per_step": per_step,
        "pairs_per_step": statistics.mean(raw["pairs"]),
        "padding_share": 1 - sum(raw["real_tokens"]) / padded if padded else 0.0,
        "peak_rss_mb": raw["peak_rss"] / 2**20,
        "rss_before_train_mb": raw["rss_before_train"] / 2**20,
        "mb_per_ktok": raw["peak_rss"] / 2**20 / (per_step / 1000),
        "final_loss": raw["final_loss"],
        "precompute_seconds": raw["precompute_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size", choices=["5m", "40m"], default="5m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--seq", type=int, default=512, help="max tokens of one sequence")
    parser.add_argument("--batch", type=int, default=2, help="our rows per step (2 x seq wide)")
    parser.add_argument("--pairs", type=int, default=600, help="dataset pairs")
    parser.add_argument("--peer", choices=["trl", "plain", "both"], default=None)
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all contenders; best of each kept"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per contender (default: all cores); 1 on a loaded host, where "
        "oversubscribed threads spin-wait and the timings scatter",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per contender")
    parser.add_argument(
        "--child", nargs=3, metavar=("NAME", "CFG", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    try:
        import trl  # noqa: F401

        have_trl = True
    except ImportError:
        have_trl = False
    peer = args.peer or ("trl" if have_trl else "plain")
    if peer in ("trl", "both") and not have_trl:
        parser.error("TRL is not installed (pip install trl, with the same torch); --peer plain")
    peers = ["trl", "plain"] if peer == "both" else [peer]

    info = {**common.machine(), **common.versions()}
    print(f"[bench] {json.dumps(info)}", file=sys.stderr, flush=True)
    model = common.model_dir(args.size)
    data = common.write_jsonl(
        common.REPO / "data" / "bench-data" / f"pairs-{args.pairs}.jsonl", bench_pairs(args.pairs)
    )
    base = {
        "model": str(model),
        "data": str(data),
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads or len(os.sched_getaffinity(0)),
    }
    raw: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, dict[str, Any]]] = [
        ("ours", base),
        ("ours-precompute", {**base, "precompute": True}),
    ]
    for round_no in range(args.repeats):
        index = 0
        while index < len(plan):  # the peers join the plan during the first round
            name, cfg = plan[index]
            index += 1
            print(f"[bench] {name} (round {round_no + 1}) ...", file=sys.stderr, flush=True)
            result = spawn(name, cfg, args.timeout)
            # Best of the rounds: noise on a shared machine only ever slows a run down.
            if name not in raw or _speed(result, args.warmup) > _speed(raw[name], args.warmup):
                raw[name] = result
            if name == "ours-precompute" and round_no == 0:
                # The peers train as many pairs per step as ours (their batch counts pairs).
                batch = max(1, round(statistics.mean(raw["ours"]["pairs"])))
                plan += [(peer_name, {**base, "batch": batch}) for peer_name in peers]
    rows = {name: summarise(r, args.warmup) for name, r in raw.items()}
    headers = ["contender", "tok/s", "pairs/s", "s/step", "pairs/step", "tok/step", "pad%"]
    headers += ["peakRSS MB", "MB/ktok", "loss"]
    lines = [
        [
            name,
            f"{r['tokens_per_s']:,.0f}",
            f"{r['pairs_per_s']:.2f}",
            f"{r['seconds_per_step']:.2f}",
            f"{r['pairs_per_step']:.1f}",
            f"{r['tokens_per_step']:,.0f}",
            f"{100 * r['padding_share']:.1f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['mb_per_ktok']:,.1f}",
            f"{r['final_loss']:.4f}",
        ]
        for name, r in rows.items()
    ]
    print(
        f"\n== DPO, {args.size} model, ours {args.batch} rows x {2 * args.seq} tokens per step, "
        f"{args.steps} steps ({args.warmup} untimed), fp32 =="
    )
    print(common.table(headers, lines))
    ratios = {}
    for name in peers:
        ratios[name] = {
            "tokens_per_s": rows["ours"]["tokens_per_s"] / rows[name]["tokens_per_s"],
            "pairs_per_s": rows["ours"]["pairs_per_s"] / rows[name]["pairs_per_s"],
            "mb_per_ktok": rows["ours"]["mb_per_ktok"] / rows[name]["mb_per_ktok"],
        }
        print(
            f"ours / {name}: tokens/s {ratios[name]['tokens_per_s']:.2f}x (goal >= 2), "
            f"pairs/s {ratios[name]['pairs_per_s']:.2f}x, peak RSS per token "
            f"{ratios[name]['mb_per_ktok']:.2f}x (goal <= 0.8)"
        )
    seconds = rows["ours-precompute"]["precompute_seconds"]
    print(
        f"ours-precompute / ours: tokens/s "
        f"{rows['ours-precompute']['tokens_per_s'] / rows['ours']['tokens_per_s']:.2f}x "
        f"(one-off reference pass: {seconds} s)"
    )
    path = common.save_results(
        "dpo", {"machine": info, "args": vars(args), "rows": rows, "ratios": ratios, "raw": raw}
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
