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
- Dropout RNG is re-seeded from (seed, step, rank) at every step: a resumed run replays exactly,
  and checkpoints carry no RNG state.
- Only rank 0 logs and saves; losses are all-reduced before they are reported.
- One host-device sync per step (the loss all-reduce's ``tolist``): batches are collated with
  their target indices and segment layout on the host by a prefetch thread, pinned, copied
  asynchronously; losses accumulate on the device. Per-step host work is O(global batch), and
  ``trained_tokens`` is a running total kept in the checkpoint state.
- Data are tokenised and packed once per (dataset, tokenizer, settings) into ``--cache-dir``
  (worker/training/datacache.py) by whichever rank takes the lock first; the others map it.
- ``LORAFLEET_DIST_TIMEOUT_SECONDS`` (default 1800) bounds every collective's wait.
- Strategy (``training.strategy``, resolved in ``_setup_strategy``): DDP replicates the model;
  FSDP2 shards it (worker/training/sharding.py). Under FSDP every forward gathers parameters, a
  collective: every rank runs the same number of forwards (a rank without rows runs an empty
  batch, in training and in eval), and only rank 0 reads the base weights.
- DPO (``method.type`` dpo) is the same loop with another loss module (``DpoLoss``) and
  normaliser: rows hold whole preference pairs (chosen and rejected side by side, several pairs
  packed with segment attention), the loss is summed over pairs and divided by the step's global
  pair count. Its reference log-probabilities come from the same model with the adapter
  disabled, in the same step, or once before training (``dpo.precompute_reference``), in which
  case the table is saved in every checkpoint so a resumed run uses the very same values.
  A job starting from ``training.init_adapter`` (SFT then DPO) has that starting adapter as its
  reference (the DPO paper's and TRL's setup): tables for the training and the validation rows
  are always precomputed before the first update, adapter on, and kept in every checkpoint
  (a resumed job's adapter has moved on: recomputing them would be wrong).
- gloo sometimes aborts at interpreter exit after a clean teardown; ranks end with os._exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, get_scheduler

from shared.datasets import DatasetError, sha256_file
from shared.estimate import choose_strategy, estimate
from shared.model_names import parse_model_name
from shared.modelinfo import read_model_info
from shared.spec import DPO_METRICS, EVAL_DPO_METRICS, JobSpec
from worker.training import data as datamod
from worker.training.attention import use_packed_attention
from worker.training.batches import HostBatch, StepBatch, StepPrefetcher, collate
from worker.training.checkpoints import CheckpointPolicy
from worker.training.datacache import prepare_rows
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
    Started,
    Step,
)
from worker.training.launch import EXIT_PREEMPTED
from worker.training.lora_dropout import fuse_lora_dropout
from worker.training.manifest import model_fingerprint, write_manifest
from worker.training.model import (
    DPO_STATS,
    CausalLMLoss,
    DpoLoss,
    apply_lora,
    disable_dropout,
    load_base_model,
    load_tokenizer,
    with_default_targets,
)
from worker.training.model_card import finish_adapter, name_base_publicly
from worker.training.sharding import (
    device_mesh,
    empty_model,
    fill_from_rank0,
    full_optimizer_state,
    gather_full,
    shard_like,
    shard_model,
    sharded_optimizer_state,
)


@dataclass
class TrainPaths:
    model: str
    output_dir: Path
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    cache_dir: Path | None = None  # prepared data (worker/training/datacache.py)
    # training.init_adapter as a local folder; None: the spec's value is one (lorafleet train)
    init_adapter: Path | None = None


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


REFERENCE_FILE = "reference_logps.npy"  # in a checkpoint: the training rows' reference table
REFERENCE_EVAL_FILE = "reference_logps_eval.npy"  # the validation rows' (init_adapter only)


class TrainingError(RuntimeError):
    """A problem with the job's inputs or settings (not a crash of the engine)."""


def _bf16_on(device: torch.device) -> bool:
    # Native support only (compute capability >= 8.0): torch can emulate bf16 on a V100 or T4,
    # slowly. shared.estimate makes the same call from the GPU's name.
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and _bf16_on(device) else None
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError("training.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    if not _bf16_on(device):
        raise TrainingError(
            f"training.precision bf16: {torch.cuda.get_device_name(device)} has no bf16 "
            "support; use fp16, fp32 or auto"
        )
    return torch.bfloat16


class LoraTrainer:
    """``setup`` → ``train`` → (``save_checkpoint``)* → ``save_final`` → ``cleanup``.

    ``setup`` is a sequence of ``_setup_*`` steps, each one concern: the process group, the data,
    the batch plan (and what a resumed checkpoint changes in it), the strategy (DDP or FSDP), the
    model, the attention fallback, the parallel wrapper, the optimizer.
    The training objective is chosen in one place, ``_build_loss``.
    """

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
        self.trained_tokens = 0  # real tokens of the steps done so far, all ranks (running total)
        self.stop_requested = False  # set by SIGUSR1: checkpoint at the end of this step and exit
        self.stop_agreed = False
        self.eval_loss: float | None = None
        self.train_loss: float | None = None
        self.grad_norm: float | None = None  # before clipping; None when clipping is off
        # DPO's numbers of the latest step and evaluation (events.DPO_METRICS; eval_ prefixed).
        self.train_metrics: dict[str, Any] = {}
        self.eval_metrics: dict[str, Any] = {}
        self.reference: np.ndarray | None = None  # precomputed DPO reference: per sequence
        self.base_dropouts_disabled = 0  # DPO: the base's dropouts set to zero
        self.reference_eval: np.ndarray | None = None  # the same for eval_rows (init_adapter)
        # DPO: "init_adapter" (the starting adapter is the reference) or "base" (adapter off)
        self.dpo_reference: str | None = None
        self.parent: dict[str, Any] | None = None  # training.init_adapter, as the manifest says
        self.resume_state: dict[str, Any] | None = None

    # ---------------------------------------------------------------- reporting
    def emit(self, record: Record) -> None:
        self._sink.log(record)

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        self.emit(Event(message=message, level=level, data=data or None))

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_plan()
        self._setup_strategy()
        self._setup_model()
        self._setup_attention()
        self._setup_parallel()
        self._setup_optimizer()
        if self.resume_state is not None:
            self._load_checkpoint(self.paths.resume_from, self.resume_state)  # type: ignore[arg-type]
        self._setup_reference()
        self._announce()

    def _setup_distributed(self) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.dist.enabled and not dist.is_initialized():
            options: dict[str, Any] = {"timeout": timedelta(seconds=dist_timeout_seconds())}
            if cuda:
                # Binds the group to this rank's GPU: NCCL connects eagerly, and no collective
                # ever guesses the device (or creates a context on GPU 0 for every rank).
                options["device_id"] = self.device
            dist.init_process_group(backend="nccl" if cuda else "gloo", **options)
        self.autocast_dtype = _resolve_precision(self.spec.training.precision, self.device)
        torch.manual_seed(self.spec.training.seed)

    def _cache_dir(self) -> Path:
        """``--cache-dir``, else a folder beside the checkpoints (kept across resumed attempts
        whenever the checkpoints are)."""
        return self.paths.cache_dir or (self._checkpoint_root().parent / "data-cache")

    def _setup_data(self) -> None:
        spec, t = self.spec, self.spec.training
        self.tokenizer = load_tokenizer(self.paths.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.dataset_sha256 = sha256_file(spec.training_file)
        try:
            prepared = prepare_rows(
                spec.training_file,
                self.tokenizer,
                max_seq_length=t.max_seq_length,
                packing=t.packing,
                cache_dir=self._cache_dir(),
                dataset_sha256=self.dataset_sha256,
            )
        except DatasetError as exc:
            raise TrainingError(f"training_file: {exc}") from None
        if len(prepared.rows) == 0:
            raise TrainingError("training_file: no example has a token to train on")
        self._check_rows_fit_method(prepared.rows, "training_file")
        self.rows = prepared.rows
        self.token_stats = prepared.stats
        self.event(
            f"data: {len(self.rows)} rows from {prepared.stats.examples} examples "
            f"({'reused' if prepared.reused else 'prepared'} in {prepared.seconds:.1f} s)",
            rows=len(self.rows),
            cache_key=prepared.key,
            reused=prepared.reused,
            seconds=round(prepared.seconds, 3),
        )
        self.eval_rows: datamod.RowSet | None = None
        if spec.validation_file:
            try:
                validation = prepare_rows(
                    spec.validation_file,
                    self.tokenizer,
                    max_seq_length=t.max_seq_length,
                    packing=False,
                    cache_dir=self._cache_dir(),
                    role="validation",
                )
            except DatasetError as exc:
                raise TrainingError(f"validation_file: {exc}") from None
            self._check_rows_fit_method(validation.rows, "validation_file")
            self.eval_rows = validation.rows if len(validation.rows) else None

    def _check_rows_fit_method(self, rows: datamod.RowSet, field: str) -> None:
        """DPO trains on preference pairs and only DPO does (the service refuses it at submit;
        ``lorafleet train`` gets here)."""
        if self.spec.method.is_dpo and not rows.pairs:
            raise TrainingError(
                f"{field}: method.type 'dpo' trains on preference pairs; this file has none"
            )
        if rows.pairs and not self.spec.method.is_dpo:
            raise TrainingError(
                f"{field}: holds preference pairs; train them with method.type 'dpo'"
            )

    def _setup_plan(self) -> None:
        """The batch plan; on resume, the checkpoint's plan is checked and kept.

        A checkpoint of another seed or dataset is refused (its data order and state belong to
        another job). Another world size re-plans the gradient accumulation so that the global
        batch, and so the data order and the optimisation, stay those of the checkpoint; when no
        accumulation can keep it, the resume is refused with the numbers to change.
        """
        t = self.spec.training
        accumulation = t.gradient_accumulation_steps
        if self.paths.resume_from is not None:
            state = json.loads((self.paths.resume_from / "state.json").read_text())
            saved_seed = state.get("seed")
            if saved_seed is not None and int(saved_seed) != t.seed:
                raise TrainingError(
                    f"training.seed: the checkpoint {self.paths.resume_from} was trained with "
                    f"seed {saved_seed}, this job has {t.seed}; resume with the same seed"
                )
            saved_data = state.get("dataset_sha256")
            if saved_data is not None and saved_data != self.dataset_sha256:
                raise TrainingError(
                    f"training_file: the checkpoint {self.paths.resume_from} was trained on "
                    "another dataset (sha256 differs); resume with the same file"
                )
            saved_global = int(state["global_batch"])
            per_pass = t.batch_size * self.dist.world_size
            if per_pass * accumulation != saved_global:
                if saved_global % per_pass:
                    raise TrainingError(
                        f"resume: the checkpoint's global batch is {saved_global} sequences "
                        f"(world size {state.get('world_size')}); training.batch_size "
                        f"{t.batch_size} x {self.dist.world_size} process(es) cannot keep it. "
                        "Resume with a world size and batch size whose product divides it"
                    )
                accumulation = saved_global // per_pass
                self.event(
                    f"world size {state.get('world_size')} -> {self.dist.world_size}: gradient "
                    f"accumulation {accumulation} keeps the global batch of {saved_global}",
                    gradient_accumulation_steps=accumulation,
                )
            self.resume_state = state
        self.plan = datamod.BatchPlan(
            num_rows=len(self.rows),
            batch_size=t.batch_size,
            world_size=self.dist.world_size,
            accumulation=accumulation,
            seed=t.seed,
        )
        self.total_steps = datamod.total_steps(self.plan, t.epochs, t.max_steps)

    def _setup_strategy(self) -> None:
        """DDP or FSDP: ``training.strategy``, where ``auto`` asks the estimate whether a whole
        replica fits the smallest rank's memory (the same call ``POST /estimate`` makes)."""
        t = self.spec.training
        if t.strategy != "auto" or not self.dist.enabled:
            self.strategy = choose_strategy(t.strategy, self.dist.world_size, 0, None)
            if t.strategy == "fsdp" and self.strategy == "ddp":
                self.event("training.strategy fsdp: one process has nothing to shard; using ddp")
            return
        limit = torch.tensor(float(self._memory_per_process()), dtype=torch.float64)
        dist.all_reduce(limit, op=dist.ReduceOp.MIN)  # the smallest rank's memory
        # Rank 0 decides, the others follow: a rank that could not read the model (a hub
        # download failing on one host) must not train with another strategy than its peers.
        decision: list[Any] = [None]
        if self.dist.is_main:
            decision[0] = self._auto_strategy(int(limit))
        dist.broadcast_object_list(decision, src=0)
        self.strategy, message, data = decision[0]
        self.event(message, level="info" if data else "warning", **data)

    def _auto_strategy(self, limit: int) -> tuple[str, str, dict[str, Any]]:
        """(strategy, event message, event data) for ``auto`` with ``limit`` bytes per rank."""
        on_gpu = self.device.type == "cuda"
        try:
            answer = estimate(
                self.spec,
                read_model_info(self._model_folder()),
                self.dist.world_size,
                limit if on_gpu else None,
                gpu_type=torch.cuda.get_device_name(self.device) if on_gpu else None,
                cpu_memory_per_process=None if on_gpu else limit,
            )
        except Exception as exc:  # unreadable folder, hub unreachable: loading will say more
            return "ddp", f"training.strategy auto: no estimate ({exc}); using ddp", {}
        strategy = answer["strategy"]
        need = answer["strategies"]["ddp"]["memory_bytes"]["total"]
        message = (
            f"training.strategy auto: {strategy} (a replica needs about {need / 2**30:.2f} GiB "
            f"of {limit / 2**30:.2f} GiB per process)"
        )
        return (
            strategy,
            message,
            {"strategy": strategy, "replica_bytes": need, "limit_bytes": limit},
        )

    def _memory_per_process(self) -> int:
        """This rank's memory: its GPU, or its share of the host's RAM (cgroup limit included)."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        from worker.host_memory import host_memory_bytes

        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        return (host_memory_bytes() or 2**62) // max(1, local)

    def _model_folder(self) -> Path:
        """The base model's local folder (a hub id: its snapshot, as from_pretrained fetches it)."""
        if Path(self.paths.model).is_dir():
            return Path(self.paths.model)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.paths.model, allow_patterns=["*.json", "*.safetensors"]))

    def _setup_model(self) -> None:
        # On a GPU the frozen base is stored in the autocast dtype (no fp32 master copy needed);
        # on CPU it stays fp32 and autocast casts per op.
        load_dtype = (
            self.autocast_dtype
            if self.device.type == "cuda" and self.autocast_dtype
            else torch.float32
        )
        self.source: PeftModel | None = None
        if self.strategy == "fsdp":
            # Every rank builds the model empty (parameters on the meta device); rank 0 alone
            # reads the weights, into the source _setup_parallel broadcasts and then drops.
            self.base = empty_model(self.paths.model, dtype=load_dtype)
            if self.dist.is_main:
                self.source = self._adapted(load_base_model(self.paths.model, dtype=load_dtype))
            self.peft_model = self._adapted(self.base)
            # The init adapter goes into rank 0's source: _setup_parallel shards it out.
            if self.source is not None:
                self.parent = self._load_init_adapter(self.source)
            self.loss_module = self._build_loss()
            return
        self.base = load_base_model(self.paths.model, dtype=load_dtype)
        self.peft_model = self._adapted(self.base)
        self.peft_model.to(self.device)
        self.parent = self._load_init_adapter(self.peft_model)
        self.loss_module = self._build_loss().to(self.device)

    def _adapted(self, base: PreTrainedModel) -> PeftModel:
        """``base`` set up for training (attention, checkpointing) with the job's adapters, drawn
        from the job's seed: the same initial adapters for every strategy and world size."""
        t = self.spec.training
        self.packed_attention = use_packed_attention(base, t.max_seq_length)
        if t.gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.lora = with_default_targets(base, self.spec.lora)
        if self.spec.method.is_dpo:
            self.base_dropouts_disabled = disable_dropout(base)
        torch.manual_seed(t.seed)
        try:
            peft_model = apply_lora(base, self.lora)
        except ValueError as exc:
            raise TrainingError(f"lora.target_modules: {exc}") from None
        fuse_lora_dropout(peft_model)
        return peft_model

    def _load_init_adapter(self, model: PeftModel) -> dict[str, Any] | None:
        """``training.init_adapter``: start from that adapter's weights instead of a fresh LoRA.

        Its shape must be this job's (r, alpha, target modules; the service checks at submit,
        ``lorafleet train`` gets here). Returns what the manifest records: the reference, the
        parent job and checkpoint step when the reference names them, and the sha256 of the
        weights file (the parent manifest's ``files`` entry for it).
        """
        reference = self.spec.training.init_adapter
        if reference is None:
            return None
        folder = self.paths.init_adapter or Path(reference)
        config_path = folder / "adapter_config.json"
        weights_path = folder / "adapter_model.safetensors"
        if not (config_path.is_file() and weights_path.is_file()):
            raise TrainingError(
                f"training.init_adapter: {folder} holds no peft adapter "
                "(adapter_config.json and adapter_model.safetensors)"
            )
        config = json.loads(config_path.read_text())
        theirs = config.get("target_modules")
        checks = (
            ("r", self.lora.r, config.get("r")),
            ("alpha", float(self.lora.alpha), float(config.get("lora_alpha") or 0)),
            (
                "target_modules",
                _module_set(self.lora.target_modules),
                _module_set(theirs),
            ),
        )
        for name, mine, parents in checks:
            if mine != parents:
                raise TrainingError(
                    f"lora.{name}: {mine} differs from the init adapter's {parents} "
                    f"({reference}); set lora.{name} to match it"
                )
        device = next(model.parameters()).device
        weights = load_file(str(weights_path), device=str(device))
        result: Any = set_peft_model_state_dict(model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise TrainingError(
                f"training.init_adapter: {folder} does not fit this model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        ref = parse_model_name(reference)
        job = ref.job_id if ref else (reference if reference.startswith("ftjob-") else None)
        digest = sha256_file(str(weights_path))
        parent: dict[str, Any] = {
            "reference": reference,
            "job": job,
            "step": ref.step if ref else None,
            "adapter_sha256": digest,
        }
        self.event(f"starting from the adapter of {reference} (sha256 {digest[:12]})", **parent)
        return parent

    def _build_loss(self) -> CausalLMLoss:
        """The training objective: the one place a method picks its loss module. Supervised
        returns (summed loss, target count), DPO (summed loss over pairs, ``DPO_STATS`` sums);
        the step divides by the global count of targets or pairs."""
        dpo = self.spec.method.dpo
        if dpo is not None:
            return DpoLoss(self.peft_model, beta=dpo.beta)
        return CausalLMLoss(self.peft_model)

    def _setup_attention(self) -> None:
        """Keep segment attention only where it reproduces transformers' masked attention."""
        if not self.packed_attention:
            return
        if self.strategy == "fsdp":
            # The check runs whole forwards: once, on rank 0's unsharded source; all follow it.
            verdict = [
                CausalLMLoss(self.source).segment_attention_error()
                if self.source is not None
                else None
            ]
            dist.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
        else:
            problem = self.loss_module.segment_attention_error()
        if problem is None:
            return
        self.base.set_attn_implementation("sdpa")
        self.packed_attention = self.loss_module.packed_attention = False
        self.event(
            f"segment attention disabled for this model ({problem}); "
            "packed rows use a block-diagonal mask instead",
            level="warning",
        )

    def _setup_parallel(self) -> None:
        """Wrap the loss module for data parallelism: DDP, or FSDP2 shards filled from rank 0."""
        if self.strategy == "fsdp":
            try:
                shard_model(
                    self.loss_module,
                    cast(PreTrainedModel, self.peft_model.get_base_model()),
                    device_mesh(self.device, self.dist.world_size),
                )
            except ValueError as exc:  # no decoder layers to shard: the job's setting to change
                raise TrainingError(f"training.strategy fsdp: {exc}") from None
            whole = self.source.state_dict() if self.source is not None else None
            fill_from_rank0(self.peft_model, self.loss_module, whole, self.device)
            self.source = whole = None  # rank 0's whole copy is gone before the first step
            gc.collect()  # peft's modules hold reference cycles: free the copy now, not later
            self.model: torch.nn.Module = self.loss_module  # fully_shard wraps in place
            return
        if not self.dist.enabled:
            self.model = self.loss_module
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffers to keep in sync (the base is frozen, LoRA has none): broadcasting them
        # every forward would only cost a collective.
        self.model = DistributedDataParallel(
            self.loss_module, device_ids=ids, broadcast_buffers=False
        )

    def _setup_optimizer(self) -> None:
        t = self.spec.training
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
        fp16 = self.autocast_dtype == torch.float16
        self.scaler: torch.amp.GradScaler
        if self.strategy == "fsdp":
            # Each rank sees only its gradient shards: the inf check must be agreed by all.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type, enabled=fp16)
        else:
            self.scaler = torch.amp.GradScaler(enabled=fp16)

    @torch.no_grad()
    def _setup_reference(self) -> None:
        """Which model is DPO's reference, and its precomputed tables.

        The base model with the adapter disabled, in every step, or once before training
        (``dpo.precompute_reference``). A job starting from ``training.init_adapter`` has that
        adapter as its reference instead (SFT then DPO: the SFT model is the reference), which
        only exists before the first update: its tables, training and validation rows, are
        always precomputed here, adapter on. A resumed job reads the tables from its checkpoint
        (and keeps the checkpoint's kind of reference), never recomputes them: its adapter has
        moved on.
        """
        dpo = self.spec.method.dpo
        if dpo is None:
            return
        init = self.spec.training.init_adapter
        self.dpo_reference = "init_adapter" if init is not None else "base"
        if self.resume_state is not None:
            # Checkpoints from before the reference followed init_adapter name none: base.
            self.dpo_reference = str(self.resume_state.get("dpo_reference", "base"))
        from_adapter = self.dpo_reference == "init_adapter"
        what = (
            f"the starting adapter of {init}"
            if from_adapter
            else "the base model (adapter disabled)"
        )
        data: dict[str, Any] = {"dpo_reference": self.dpo_reference}
        if not (from_adapter or dpo.precompute_reference):
            self.event(f"DPO reference: {what}, computed in every step", **data)
            return
        folder = self.paths.resume_from
        if folder is not None and (folder / REFERENCE_FILE).exists():
            self.reference = self._saved_table(folder / REFERENCE_FILE, self.rows)
            if from_adapter and self.eval_rows is not None:
                self.reference_eval = self._saved_table(
                    folder / REFERENCE_EVAL_FILE, self.eval_rows
                )
            self.event(
                f"DPO reference: {what}, log-probabilities of {self._table_size()} sequences "
                "restored from the checkpoint",
                sequences=self._table_size(),
                **data,
            )
            return
        if from_adapter and folder is not None:
            raise TrainingError(
                f"resume: the checkpoint {folder} has no {REFERENCE_FILE}; the DPO reference "
                "(the starting adapter) cannot be recomputed once training has moved it"
            )
        started = time.monotonic()
        self.reference = self._reference_table(self.rows, with_adapter=from_adapter)
        if from_adapter and self.eval_rows is not None:
            self.reference_eval = self._reference_table(self.eval_rows, with_adapter=True)
        seconds = time.monotonic() - started
        self.event(
            f"DPO reference: {what}, precomputed for {self._table_size()} sequences in "
            f"{seconds:.1f} s",
            sequences=self._table_size(),
            seconds=round(seconds, 3),
            **data,
        )

    def _table_size(self) -> int:
        return sum(len(t) for t in (self.reference, self.reference_eval) if t is not None)

    @staticmethod
    def _saved_table(path: Path, rows: datamod.RowSet) -> np.ndarray:
        """A checkpoint's reference table for ``rows``, checked to be whole."""
        if not path.exists():
            raise TrainingError(
                f"resume: the checkpoint has no {path.name}; the DPO reference (the starting "
                "adapter) cannot be recomputed once training has moved it"
            )
        table = np.load(path)
        if len(table) != rows.num_sequences:
            raise TrainingError(
                f"resume: {path} holds {len(table)} reference log-probabilities for "
                f"{rows.num_sequences} sequences; resume with the same files"
            )
        return cast(np.ndarray, table)

    def _reference_table(self, rows: datamod.RowSet, with_adapter: bool) -> np.ndarray:
        """Every sequence of ``rows``: its reference log-probability, the adapter off or (the
        starting adapter, before any update) on. Each rank computes its share of the rows, then
        the table is summed over ranks."""
        loss = self.loss_module
        table = torch.zeros(rows.num_sequences, dtype=torch.float64, device=self.device)
        mine = np.arange(self.dist.rank, len(rows), self.dist.world_size)
        bs = self.spec.training.batch_size
        was_training = loss.training
        loss.eval()
        # As many batches on every rank (a short rank's last ones empty), each through the
        # module's forward: under FSDP every forward is a collective.
        batches = math.ceil(math.ceil(len(rows) / self.dist.world_size) / bs)
        for start in range(0, batches * bs, bs):
            inputs = self._collate(mine[start : start + bs], rows).to(self.device)
            with self._autocast():
                logps, _ = loss(**inputs, reference_only=True, reference_with_adapter=with_adapter)
            pair_ids = inputs["pair_ids"]
            both = (pair_ids[:, None] * 2 + torch.arange(2, device=self.device)).reshape(-1)
            table.index_copy_(0, both, logps.double())
        loss.train(was_training)
        if self.dist.enabled:
            dist.all_reduce(table)  # each sequence was computed by exactly one rank
        return cast(np.ndarray, table.cpu().numpy())

    def _announce(self) -> None:
        stats, t = self.token_stats, self.spec.training
        units = f"{stats.examples - stats.dropped_no_labels} pairs in " if self.rows.pairs else ""
        self.emit(Started(strategy=self.strategy, world_size=self.dist.world_size))
        self.event(
            f"training {self.trainable_params:,} of {self.total_params:,} parameters on "
            f"{self.dist.world_size} {self.device.type} process(es) ({self.strategy}); "
            f"{units}{len(self.rows)} rows, {self.total_steps} steps",
            strategy=self.strategy,
            examples=stats.examples,
            truncated=stats.truncated,
            dropped=stats.dropped_no_labels,
            rows=len(self.rows),
            total_steps=self.total_steps,
            world_size=self.dist.world_size,
            global_batch=self.plan.global_batch,
            attention="segments" if self.packed_attention else "mask",
            method=self.spec.method.type,
        )
        if self.base_dropouts_disabled:
            self.event(
                f"DPO: the base model's {self.base_dropouts_disabled} dropout(s) set to 0 so the "
                "reference and the policy see the same deterministic model (lora.dropout kept)",
                dropouts_disabled=self.base_dropouts_disabled,
            )
        if stats.truncated:
            self.event(
                f"{stats.truncated} example(s) longer than max_seq_length "
                f"{t.max_seq_length} were truncated",
                level="warning",
                truncated=stats.truncated,
            )

    # ---------------------------------------------------------------- batches
    def _collate(self, indices: np.ndarray | list[int], rows: datamod.RowSet) -> HostBatch:
        return collate(
            rows,
            indices,
            self.pad_id,
            segments=self.packed_attention,
            packed=self.spec.training.packing and rows is self.rows,
            pin=self.device.type == "cuda",
            reference=self.reference
            if rows is self.rows
            else self.reference_eval
            if rows is self.eval_rows
            else None,
        )

    def _host_step(self, step: int) -> StepBatch:
        """This rank's micro-batches of ``step`` and the step's global counts (host only)."""
        rows = self.plan.step_rows(step)
        return StepBatch(
            step=step,
            micro=[
                self._collate(self.plan.slice_for(step, micro, self.dist.rank), self.rows)
                for micro in range(self.plan.accumulation)
            ],
            label_tokens=int(self.rows.labels[rows].sum()),
            real_tokens=int(self.rows.real_tokens[rows].sum()),
            pairs=int(self.rows.pair_counts[rows].sum()),
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _all_sum(self, *values: torch.Tensor) -> list[float]:
        """Sum device scalars over ranks; the one host-device sync of a step (``tolist``)."""
        tensor = torch.stack([v.to(self.device, torch.float64) for v in values])
        if self.dist.enabled:
            dist.all_reduce(tensor)
        return cast(list[float], tensor.tolist())

    # ---------------------------------------------------------------- training
    def train_step(self, step: int, batch: StepBatch | None = None) -> float:
        """One optimizer step; returns the global mean loss per target token (DPO: per pair,
        with the step's DPO numbers in ``train_metrics``)."""
        batch = batch if batch is not None else self._host_step(step)
        torch.manual_seed(
            self.spec.training.seed * 100_003 + step * self.dist.world_size + self.dist.rank
        )
        self.model.train()
        dpo = self.spec.method.is_dpo
        global_tokens = max(1, batch.pairs if dpo else batch.label_tokens)
        local_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        local_stats = torch.zeros(len(DPO_STATS), dtype=torch.float32, device=self.device)
        for micro, host in enumerate(batch.micro):
            inputs = host.to(self.device)
            last = micro == len(batch.micro) - 1
            with self._gradient_sync(last):
                with self._autocast():
                    loss_sum, extra = self.model(**inputs)
                scaled = loss_sum * (self.dist.world_size / global_tokens)
                self.scaler.scale(scaled).backward()
            local_sum += loss_sum.detach().float()  # stays on the device: no sync per micro-step
            if dpo:
                local_stats += extra.float()
        norm = torch.zeros((), device=self.device)
        clip = self.spec.training.max_grad_norm
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.loss_module.parameters() if p.requires_grad], clip
            )
            if isinstance(norm, DTensor):  # FSDP: already reduced over the shards
                norm = norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The preemption flag and the gradient norm (the same on every rank) ride on the loss
        # all-reduce: every rank stops after the same step, and the step has one sync.
        stop = torch.full((), float(self.stop_requested), device=self.device)
        extras = local_stats.unbind() if dpo else ()
        total, agreed, norms, *stats = self._all_sum(local_sum, stop, norm, *extras)
        self.stop_agreed = agreed > 0
        self.grad_norm = norms / self.dist.world_size if clip is not None else None
        if dpo:
            self.train_metrics = _dpo_means(stats)
        return total / global_tokens

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Reduce gradients over ranks only in the step's last micro-step's backward."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            # Unsharded gradients accumulate until then (the adapters': small).
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            return contextlib.nullcontext()
        if last:
            return contextlib.nullcontext()
        return cast(contextlib.AbstractContextManager[Any], self.model.no_sync())  # type: ignore[operator]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss on the validation rows (per target token; DPO: per pair, with the DPO
        numbers in ``eval_metrics``, the reference computed on the fly, or from the table
        precomputed at start when the starting adapter is the reference)."""
        if self.eval_rows is None:
            return None
        self.model.eval()
        mine = np.arange(self.dist.rank, len(self.eval_rows), self.dist.world_size)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        stats = torch.zeros(len(DPO_STATS), dtype=torch.float32, device=self.device)
        count = 0
        bs = self.spec.training.batch_size
        # As many batches on every rank (the last ones of a short rank empty): under FSDP each
        # forward is a collective.
        batches = math.ceil(math.ceil(len(self.eval_rows) / self.dist.world_size) / bs)
        for start in range(0, batches * bs, bs):
            host = self._collate(mine[start : start + bs], self.eval_rows)
            with self._autocast():
                s, extra = self.loss_module(**host.to(self.device))
            loss_sum += s.float()
            if self.spec.method.is_dpo:
                stats += extra.float()
            else:
                count += int(extra)
        if self.spec.method.is_dpo:
            total, *sums = self._all_sum(loss_sum, *stats.unbind())
            self.eval_metrics = {f"eval_{k}": v for k, v in _dpo_means(sums).items()}
            return total / max(sums[-1], 1.0)
        total, tokens = self._all_sum(loss_sum, torch.tensor(float(count)))
        return total / max(tokens, 1.0)

    def train(self) -> dict[str, Any] | None:
        """Run to the end and save the adapter; None when preempted (checkpoint saved instead)."""
        t = self.spec.training
        started = time.monotonic()
        tokens_done = 0
        prefetch = StepPrefetcher(self._host_step, range(self.start_step, self.total_steps))
        try:
            for step in range(self.start_step, self.total_steps):
                batch = prefetch.next(step)
                self.train_loss = self.train_step(step, batch)
                done = step + 1
                tokens_done += batch.real_tokens
                self.trained_tokens += batch.real_tokens
                # Eval every eval_every_steps and always after the last step (when there is data).
                evaluated = self.eval_rows is not None and (
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
                        grad_norm=self.grad_norm,
                        eval_loss=self.eval_loss,
                        evaluated=evaluated,
                        learning_rate=self.scheduler.get_last_lr()[0],
                        tokens_per_second=tokens_done / elapsed if elapsed > 0 else None,
                        eta_seconds=elapsed / steps_this_run * (self.total_steps - done),
                        trained_tokens=self.trained_tokens if done == self.total_steps else None,
                        **self.train_metrics,
                        **self.eval_metrics,
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
        finally:
            prefetch.close()
        if self.start_step >= self.total_steps and self.eval_rows is not None:
            self.eval_loss = self.evaluate()  # resumed at the very end
        return self.save_final(time.monotonic() - started)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_root(self) -> Path:
        return self.paths.checkpoint_dir or (self.paths.output_dir / "checkpoints")

    def _adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The adapters' whole weights for ``save_pretrained`` under FSDP (gathered: every rank
        calls this); None under DDP, where peft reads the live replica itself."""
        if self.strategy != "fsdp":
            return None
        return gather_full((n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad)

    def save_checkpoint(self, step: int) -> None:
        """Adapter + optimizer + scheduler + data position, written under a temporary name and
        renamed, so a reader never sees half a checkpoint. Whole tensors under either strategy
        (FSDP gathers its shards first), so any strategy and world size can resume it."""
        adapter = self._adapter_state()
        optimizer = full_optimizer_state(self.optimizer)
        if self.dist.is_main:
            root = self._checkpoint_root()
            root.mkdir(parents=True, exist_ok=True)
            final = root / f"step_{step}"
            tmp = root / f".step_{step}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.peft_model.save_pretrained(str(tmp), state_dict=adapter)
            name_base_publicly(tmp, self.spec.base_model)
            # No RNG state: dropout is re-seeded from (seed, step, rank) at every step, and the
            # data order is a pure function of (seed, epoch), so a resume replays exactly.
            torch.save(
                {
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                tmp / "trainer_state.pt",
            )
            metrics = {
                "step": step,
                "epoch": step / self.plan.steps_per_epoch,
                "global_batch": self.plan.global_batch,
                "world_size": self.dist.world_size,
                "strategy": self.strategy,
                "train_loss": self.train_loss,
                "eval_loss": self.eval_loss,
                **self.train_metrics,
                **self.eval_metrics,
                "seed": self.spec.training.seed,
            }
            if self.reference is not None:
                np.save(tmp / REFERENCE_FILE, self.reference)
            if self.reference_eval is not None:
                np.save(tmp / REFERENCE_EVAL_FILE, self.reference_eval)
            state = {
                **metrics,
                "trained_tokens": self.trained_tokens,
                "dataset_sha256": self.dataset_sha256,
                "dpo_reference": self.dpo_reference,
            }
            (tmp / "state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
            self.emit(CheckpointSaved(step=step, path=str(final), state=metrics))
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
        weights = load_file(str(path / "adapter_model.safetensors"))
        live = get_peft_model_state_dict(self.peft_model)  # the same keys, this rank's tensors
        set_peft_model_state_dict(
            self.peft_model, {key: shard_like(value, live[key]) for key, value in weights.items()}
        )
        trainer_state = torch.load(
            path / "trainer_state.pt", map_location="cpu", weights_only=False
        )
        self.optimizer.load_state_dict(
            sharded_optimizer_state(self.optimizer, trainer_state["optimizer"])
        )
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.scaler.load_state_dict(trainer_state["scaler"])
        self.start_step = int(state["step"])
        saved_tokens = state.get("trained_tokens")
        self.trained_tokens = (
            int(saved_tokens)
            if saved_tokens is not None  # checkpoints before the running total: count once
            else self.plan.tokens_before(self.start_step, self.rows.real_tokens)
        )
        self.train_loss = state.get("train_loss")
        self.eval_loss = state.get("eval_loss")
        if self.spec.method.is_dpo:
            self.train_metrics = {k: state[k] for k in DPO_METRICS if state.get(k) is not None}
            self.eval_metrics = {k: state[k] for k in EVAL_DPO_METRICS if state.get(k) is not None}
        self.emit(Resumed(step=self.start_step))

    # ---------------------------------------------------------------- output
    def save_final(self, duration: float) -> dict[str, Any]:
        manifest: dict[str, Any] = {}
        adapter = self._adapter_state()
        if self.dist.is_main:
            out = self.paths.output_dir
            out.mkdir(parents=True, exist_ok=True)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.peft_model.save_pretrained(str(tmp), state_dict=adapter)
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
            shutil.rmtree(tmp, ignore_errors=True)
            t = self.spec.training
            manifest = write_manifest(
                out,
                {
                    "world_size": self.dist.world_size,
                    "strategy": self.strategy,
                    "steps": self.total_steps,
                    "trained_tokens": self.trained_tokens,
                    "base_model": {
                        "name": self.spec.base_model,
                        **model_fingerprint(self.paths.model),
                    },
                    "dataset_sha256": self.dataset_sha256,
                    "validation_sha256": sha256_file(self.spec.validation_file)
                    if self.spec.validation_file
                    else None,
                    "seed": t.seed,
                    "effective_batch": self.plan.global_batch,
                    "gradient_accumulation_steps": self.plan.accumulation,
                    "final_train_loss": self.train_loss,
                    "final_eval_loss": self.eval_loss,
                    "method": self.spec.method.model_dump(),
                    "dpo_reference": self.dpo_reference,
                    "init_adapter": self.parent,
                    "final_metrics": {**self.train_metrics, **self.eval_metrics} or None,
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


def _module_set(value: Any) -> Any:
    """Target modules compared as a set (peft may store them in another order)."""
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))


def _dpo_means(sums: list[float]) -> dict[str, float | None]:
    """The DPO_METRICS as means over pairs, from the all-reduced ``DPO_STATS`` sums."""
    pairs = sums[DPO_STATS.index("pairs")]
    return {name: (sums[i] / pairs if pairs else None) for i, name in enumerate(DPO_METRICS)}


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


# A CUDA rank's CPU work is the collator thread and kernel launches: a few threads are plenty, and
# more only oversubscribe the cores the other ranks of the host need.
CUDA_RANK_THREADS = 4


def _configure_threads(info: DistInfo) -> None:
    """The host's cores split between its ranks, unless the operator set ``OMP_NUM_THREADS``
    (several workers or other services on one host): an explicit setting is an upper bound.
    Oversubscribed OpenMP threads spin-wait on each other; on a busy 2-core host that made a
    tiny model's steps 30x slower than one thread per rank."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    threads = max(1, cores // max(1, local))
    if torch.cuda.is_available():
        threads = min(threads, CUDA_RANK_THREADS)
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        threads = min(threads, int(explicit))
    torch.set_num_threads(threads)


def dist_timeout_seconds() -> float:
    """``LORAFLEET_DIST_TIMEOUT_SECONDS`` (default 1800): how long a collective may wait for the
    slowest rank before the group fails (torch's NCCL default is 10 minutes)."""
    return float(os.environ.get("LORAFLEET_DIST_TIMEOUT_SECONDS", "1800"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lorafleet training engine (one rank)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", help="resolved base model path (default spec.base_model)")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume-from")
    parser.add_argument("--progress-file")
    parser.add_argument("--keep-checkpoints", type=int, default=CheckpointPolicy().keep)
    parser.add_argument(
        "--init-adapter",
        help="local folder of training.init_adapter when the spec names it by job or checkpoint",
    )
    parser.add_argument(
        "--cache-dir",
        help="folder for prepared (tokenised, packed) data, shared by the ranks and reused by "
        "resumed attempts; default: data-cache beside the checkpoint folder",
    )
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
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            init_adapter=Path(args.init_adapter) if args.init_adapter else None,
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
