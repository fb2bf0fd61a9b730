"""The LoRA training loop: one job, one class, readable top to bottom.

Launch (one process per device; ``lorafleet train`` and the Celery task both use launch.py):

    # one process, no DDP
    python -m worker.training.engine --spec spec.json --out OUT
    # N ranks: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT per process (torchrun works too)
    torchrun --nproc-per-node 2 -m worker.training.engine --spec spec.json --out OUT

The engine knows nothing of HTTP, Celery or the database: it gets a validated ``JobSpec`` whose
files are local paths, a model path, and a progress sink; it writes checkpoints under
``--checkpoint-dir`` and the peft adapter + ``manifest.json`` into ``--out``.

Gotchas recorded:
- Gradients are summed over the step's target tokens and divided by the *global* count of the step
  (known to every rank from the batch plan), times world size because DDP averages. So the update
  is independent of how rows are split over ranks and micro-steps.
- Dropout RNG is re-seeded from (seed, step, rank) at every step: a resumed run replays exactly.
- Only rank 0 logs and saves; losses are all-reduced before they are reported.
- gloo sometimes aborts at interpreter exit after a clean teardown; ranks end with os._exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from shared.datasets import load_examples, sha256_file
from shared.spec import JobSpec
from worker.training import data as datamod
from worker.training.attention import build_layout, use_packed_attention
from worker.training.checkpoints import CheckpointPolicy
from worker.training.events import (
    CheckpointSaved,
    Done,
    Error,
    Event,
    JsonlSink,
    NullSink,
    Preempted,
    Record,
    Resumed,
    Sink,
    Step,
)
from worker.training.launch import EXIT_PREEMPTED
from worker.training.lora_dropout import fuse_lora_dropout
from worker.training.manifest import model_fingerprint, write_manifest
from worker.training.model import (
    CausalLMLoss,
    apply_lora,
    load_base_model,
    load_tokenizer,
    with_default_targets,
)
from worker.training.model_card import finish_adapter


@dataclass
class TrainPaths:
    model: str
    output_dir: Path
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


class TrainingError(RuntimeError):
    """A problem with the job's inputs or settings (not a crash of the engine)."""


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError("training.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16


class LoraTrainer:
    """``setup`` → ``train`` → (``save_checkpoint``)* → ``save_final`` → ``cleanup``."""

    def __init__(
        self,
        spec: JobSpec,
        paths: TrainPaths,
        sink: Sink | None = None,
        dist_info: DistInfo | None = None,
        keep_checkpoints: int = CheckpointPolicy().keep,
    ) -> None:
        self.spec = spec
        self.paths = paths
        self.dist = dist_info or DistInfo()
        # Only rank 0 reports (torchtune's rule): the others would repeat the same numbers.
        self._sink: Sink = sink if sink is not None and self.dist.is_main else NullSink()
        self.keep_checkpoints = keep_checkpoints
        self.start_step = 0
        self.stop_requested = False  # set by SIGUSR1: checkpoint at the end of this step and exit
        self.stop_agreed = False
        self.eval_loss: float | None = None
        self.train_loss: float | None = None

    # ---------------------------------------------------------------- reporting
    def emit(self, record: Record) -> None:
        self._sink.log(record)

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        self.emit(Event(message=message, level=level, data=data or None))

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        spec, t = self.spec, self.spec.training
        if self.dist.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        self.autocast_dtype = _resolve_precision(t.precision, self.device)
        torch.manual_seed(t.seed)

        self.tokenizer = load_tokenizer(self.paths.model)
        train_examples = load_examples(spec.training_file)
        tokenized, stats = datamod.tokenize_all(self.tokenizer, train_examples, t.max_seq_length)
        if not tokenized:
            raise TrainingError("training_file: no example has a token to train on")
        self.token_stats = stats
        pad_id = int(self.tokenizer.pad_token_id)
        self.pad_id = pad_id
        if t.packing:
            self.rows = datamod.pack(tokenized, t.max_seq_length, pad_id)
        else:
            self.rows = datamod.unpacked_rows(tokenized)
        self.eval_rows: list[datamod.Row] = []
        if spec.validation_file:
            val, _ = datamod.tokenize_all(
                self.tokenizer, load_examples(spec.validation_file), t.max_seq_length
            )
            self.eval_rows = datamod.unpacked_rows(val)

        accumulation = t.gradient_accumulation_steps
        resume_state: dict[str, Any] | None = None
        if self.paths.resume_from is not None:
            resume_state = json.loads((self.paths.resume_from / "state.json").read_text())
            saved_global = int(resume_state["global_batch"])
            per_pass = t.batch_size * self.dist.world_size
            if per_pass * accumulation != saved_global and saved_global % per_pass == 0:
                # Another machine with another device count: keep the global batch, and so the
                # data plan and the optimisation, identical.
                accumulation = saved_global // per_pass
        self.plan = datamod.BatchPlan(
            num_rows=len(self.rows),
            batch_size=t.batch_size,
            world_size=self.dist.world_size,
            accumulation=accumulation,
            seed=t.seed,
        )
        self.total_steps = datamod.total_steps(self.plan, t.epochs, t.max_steps)

        load_dtype = (
            self.autocast_dtype
            if self.device.type == "cuda" and self.autocast_dtype
            else torch.float32
        )
        base = load_base_model(self.paths.model, dtype=load_dtype)
        self.packed_attention = use_packed_attention(base, t.max_seq_length)
        if t.gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.lora = with_default_targets(base, spec.lora)
        try:
            self.peft_model = apply_lora(base, self.lora)
        except ValueError as exc:
            raise TrainingError(f"lora.target_modules: {exc}") from None
        fuse_lora_dropout(self.peft_model)
        self.peft_model.to(self.device)
        self.loss_module = CausalLMLoss(self.peft_model).to(self.device)
        if self.packed_attention:
            problem = self.loss_module.segment_attention_error()
            if problem is not None:
                base.set_attn_implementation("sdpa")
                self.packed_attention = self.loss_module.packed_attention = False
                self.event(
                    f"segment attention disabled for this model ({problem}); "
                    "packed rows use a block-diagonal mask instead",
                    level="warning",
                )
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: torch.nn.Module = DistributedDataParallel(self.loss_module, device_ids=ids)
        else:
            self.model = self.loss_module
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        self.total_params = sum(p.numel() for p in self.peft_model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)

        if resume_state is not None:
            self._load_checkpoint(self.paths.resume_from, resume_state)  # type: ignore[arg-type]
        self.event(
            f"training {self.trainable_params:,} of {self.total_params:,} parameters on "
            f"{self.dist.world_size} {self.device.type} process(es); {len(self.rows)} rows, "
            f"{self.total_steps} steps",
            examples=stats.examples,
            truncated=stats.truncated,
            dropped=stats.dropped_no_labels,
            rows=len(self.rows),
            total_steps=self.total_steps,
            world_size=self.dist.world_size,
            global_batch=self.plan.global_batch,
            attention="segments" if self.packed_attention else "mask",
        )
        if stats.truncated:
            self.event(
                f"{stats.truncated} example(s) longer than max_seq_length "
                f"{t.max_seq_length} were truncated",
                level="warning",
                truncated=stats.truncated,
            )

    # ---------------------------------------------------------------- batches
    def _collate(self, indices: list[int], rows: list[datamod.Row], packed: bool) -> dict[str, Any]:
        dummy = not indices
        chosen = [rows[i] for i in indices] if indices else [rows[0]]
        width = max(len(r.input_ids) for r in chosen)
        ids, targets, positions, mask = [], [], [], []
        for row in chosen:
            pad = width - len(row.input_ids)
            ids.append(row.input_ids + [self.pad_id] * pad)
            tgt = [datamod.IGNORE] * len(row.targets) if dummy else row.targets
            targets.append(tgt + [datamod.IGNORE] * pad)
            positions.append(row.position_ids + list(range(pad)))
            mask.append([1] * len(row.input_ids) + [0] * pad)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, device=self.device),
            "targets": torch.tensor(targets, device=self.device),
        }
        if self.packed_attention:
            # Right padding restarts its positions at 0, so it is a segment of its own: packed or
            # not, every document attends to itself only (worker/training/attention.py).
            position_ids = torch.tensor(positions)
            batch["position_ids"] = position_ids.to(self.device)
            batch["layout"] = build_layout(position_ids, self.device)
        elif packed:
            # No attention mask: transformers derives the block-diagonal mask from position_ids.
            batch["position_ids"] = torch.tensor(positions, device=self.device)
        else:
            batch["attention_mask"] = torch.tensor(mask, device=self.device)
        return batch

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _all_sum(self, *values: float) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dist.enabled:
            dist.all_reduce(tensor)
        return tensor.tolist()

    # ---------------------------------------------------------------- training
    def train_step(self, step: int) -> float:
        torch.manual_seed(
            self.spec.training.seed * 100_003 + step * self.dist.world_size + self.dist.rank
        )
        self.model.train()
        step_rows = self.plan.step_rows(step)
        global_tokens = max(1, sum(self.rows[i].label_tokens for i in step_rows))
        local_sum = 0.0
        for micro in range(self.plan.accumulation):
            indices = self.plan.slice_for(step, micro, self.dist.rank)
            batch = self._collate(indices, self.rows, self.spec.training.packing)
            last = micro == self.plan.accumulation - 1
            sync = (
                self.model.no_sync()  # type: ignore[operator]
                if self.dist.enabled and not last
                else contextlib.nullcontext()
            )
            with sync:
                with self._autocast():
                    loss_sum, _ = self.model(**batch)
                scaled = loss_sum * (self.dist.world_size / global_tokens)
                self.scaler.scale(scaled).backward()
            local_sum += float(loss_sum.detach())
        if self.spec.training.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.loss_module.parameters() if p.requires_grad],
                self.spec.training.max_grad_norm,
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The preemption flag rides on the loss all-reduce: every rank stops after the same step.
        total, stop = self._all_sum(local_sum, float(self.stop_requested))
        self.stop_agreed = stop > 0
        return total / global_tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_rows:
            return None
        self.model.eval()
        mine = list(range(self.dist.rank, len(self.eval_rows), self.dist.world_size))
        loss_sum = 0.0
        count = 0.0
        bs = self.spec.training.batch_size
        for start in range(0, len(mine), bs):
            batch = self._collate(mine[start : start + bs], self.eval_rows, packed=False)
            with self._autocast():
                s, c = self.loss_module(**batch)
            loss_sum += float(s)
            count += float(c)
        total, tokens = self._all_sum(loss_sum, count)
        return total / max(tokens, 1.0)

    def _tokens_of_step(self, step: int) -> int:
        return sum(self.rows[i].real_tokens for i in self.plan.step_rows(step))

    def train(self) -> dict[str, Any] | None:
        """Run to the end and save the adapter; None when preempted (checkpoint saved instead)."""
        t = self.spec.training
        started = time.monotonic()
        tokens_done = 0
        for step in range(self.start_step, self.total_steps):
            self.train_loss = self.train_step(step)
            done = step + 1
            tokens_done += self._tokens_of_step(step)
            # Eval every eval_every_steps and always after the last step (when there is data).
            evaluated = bool(self.eval_rows) and (
                done == self.total_steps
                or bool(t.eval_every_steps and done % t.eval_every_steps == 0)
            )
            if evaluated:
                self.eval_loss = self.evaluate()
            elapsed = time.monotonic() - started
            steps_this_run = done - self.start_step
            self.emit(
                Step(
                    step=done,
                    total_steps=self.total_steps,
                    epoch=round(done / self.plan.steps_per_epoch, 4),
                    train_loss=self.train_loss,
                    eval_loss=self.eval_loss,
                    evaluated=evaluated,
                    learning_rate=self.scheduler.get_last_lr()[0],
                    tokens_per_second=tokens_done / elapsed if elapsed > 0 else None,
                    eta_seconds=elapsed / steps_this_run * (self.total_steps - done),
                    trained_tokens=sum(self._tokens_of_step(s) for s in range(done))
                    if done == self.total_steps
                    else None,
                )
            )
            if self.stop_agreed and done < self.total_steps:
                self.save_checkpoint(done)
                self.emit(Preempted(step=done))
                return None
            if (
                t.checkpoint_every_steps
                and done % t.checkpoint_every_steps == 0
                and done < self.total_steps
            ):
                self.save_checkpoint(done)
        if self.start_step >= self.total_steps and self.eval_rows:  # resumed at the very end
            self.eval_loss = self.evaluate()
        return self.save_final(time.monotonic() - started)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_root(self) -> Path:
        return self.paths.checkpoint_dir or (self.paths.output_dir / "checkpoints")

    def save_checkpoint(self, step: int) -> None:
        """Adapter + optimizer + scheduler + RNG + data position, written under a temporary name
        and renamed, so a reader never sees half a checkpoint."""
        if self.dist.is_main:
            root = self._checkpoint_root()
            root.mkdir(parents=True, exist_ok=True)
            final = root / f"step_{step}"
            tmp = root / f".step_{step}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.peft_model.save_pretrained(str(tmp))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                tmp / "trainer_state.pt",
            )
            state = {
                "step": step,
                "epoch": step / self.plan.steps_per_epoch,
                "global_batch": self.plan.global_batch,
                "world_size": self.dist.world_size,
                "train_loss": self.train_loss,
                "eval_loss": self.eval_loss,
                "seed": self.spec.training.seed,
            }
            (tmp / "state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
            self.emit(CheckpointSaved(step=step, path=str(final), state=state))
        if self.dist.enabled:
            dist.barrier()

    def _prune_checkpoints(self, root: Path) -> None:
        found = sorted(
            (int(p.name.split("_")[1]), p)
            for p in root.glob("step_*")
            if p.name.split("_")[1].isdigit()
        )
        for _, path in found[: -self.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        weights = load_file(str(path / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.peft_model, weights)
        trainer_state = torch.load(
            path / "trainer_state.pt", map_location=self.device, weights_only=False
        )
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.scaler.load_state_dict(trainer_state["scaler"])
        self.start_step = int(state["step"])
        self.train_loss = state.get("train_loss")
        self.eval_loss = state.get("eval_loss")
        self.emit(Resumed(step=self.start_step))

    # ---------------------------------------------------------------- output
    def save_final(self, duration: float) -> dict[str, Any]:
        manifest: dict[str, Any] = {}
        if self.dist.is_main:
            out = self.paths.output_dir
            out.mkdir(parents=True, exist_ok=True)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.peft_model.save_pretrained(str(tmp))
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
            shutil.rmtree(tmp, ignore_errors=True)
            t = self.spec.training
            manifest = write_manifest(
                out,
                {
                    "world_size": self.dist.world_size,
                    "steps": self.total_steps,
                    "trained_tokens": sum(self._tokens_of_step(s) for s in range(self.total_steps)),
                    "base_model": {
                        "name": self.spec.base_model,
                        **model_fingerprint(self.paths.model),
                    },
                    "dataset_sha256": sha256_file(self.spec.training_file),
                    "validation_sha256": sha256_file(self.spec.validation_file)
                    if self.spec.validation_file
                    else None,
                    "seed": t.seed,
                    "effective_batch": self.plan.global_batch,
                    "gradient_accumulation_steps": self.plan.accumulation,
                    "final_train_loss": self.train_loss,
                    "final_eval_loss": self.eval_loss,
                    "parameters": {"total": self.total_params, "trainable": self.trainable_params},
                    "lora": self.lora.model_dump(),
                    "training": t.model_dump(),
                    "precision": str(self.autocast_dtype or torch.float32).replace("torch.", ""),
                    "device": self.device.type,
                    "examples": self.token_stats.examples,
                    "truncated_examples": self.token_stats.truncated,
                    "dropped_examples": self.token_stats.dropped_no_labels,
                    "duration_seconds": round(duration, 3),
                    "created_at": datetime.now(UTC).isoformat(),
                },
            )
            manifest = finish_adapter(out, manifest)  # model card, public base name
            self.emit(Done(manifest=manifest))
        if self.dist.enabled:
            dist.barrier()
        return manifest

    def cleanup(self) -> None:
        if self.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------- process entry
def _die_with_parent() -> None:
    """A rank must never outlive the worker that launched it (no orphan holding a GPU)."""
    parent = int(os.environ.get("LORAFLEET_PARENT_PID", "0"))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if not parent:
        return
    if os.getppid() != parent:
        os._exit(137)

    def watch() -> None:  # belt and braces where prctl is unavailable
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


def read_spec(path: str) -> JobSpec:
    return JobSpec.model_validate_json(Path(path).read_text())


def _configure_threads(info: DistInfo) -> None:
    if torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(max(1, cores // max(1, local)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lorafleet training engine (one rank)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", help="resolved base model path (default spec.base_model)")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume-from")
    parser.add_argument("--progress-file")
    parser.add_argument("--keep-checkpoints", type=int, default=CheckpointPolicy().keep)
    args = parser.parse_args(argv)
    _die_with_parent()
    info = DistInfo.from_env()
    _configure_threads(info)
    sink: Sink = NullSink()
    if info.is_main:
        sink = (
            JsonlSink.to_path(args.progress_file) if args.progress_file else JsonlSink(sys.stdout)
        )
    spec = read_spec(args.spec)
    trainer = LoraTrainer(
        spec,
        TrainPaths(
            model=args.model_path or spec.base_model,
            output_dir=Path(args.out),
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
            resume_from=Path(args.resume_from) if args.resume_from else None,
        ),
        sink=sink,
        dist_info=info,
        keep_checkpoints=args.keep_checkpoints,
    )
    # A draining worker asks for a checkpoint now instead of waiting for the job to finish.
    signal.signal(signal.SIGUSR1, lambda *_: setattr(trainer, "stop_requested", True))
    code = 0
    try:
        trainer.setup()
        if trainer.train() is None:
            code = EXIT_PREEMPTED
    except TrainingError as exc:
        sink.log(Error(code="invalid_job", message=str(exc)))
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:
        sink.log(Error(code="training_failed", message=f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        code = 1
    finally:
        trainer.cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
