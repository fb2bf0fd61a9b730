"""Batches made on the host, off the main thread, while the device computes.

The collator turns row indices into padded int64 tensors plus what the step would otherwise
derive on the device at the cost of a host-device sync: the flat indices of the positions that
carry a target (boolean indexing on a GPU waits for the device to know the result's size) and the
segment layout (worker/training/attention.py). On CUDA the tensors are pinned, so the main thread's
copies are asynchronous. ``StepPrefetcher`` runs the collator for the next steps in a thread: numpy
and small torch CPU ops release the GIL, so the next step is ready when the device finishes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.training.attention import SegmentLayout, build_layout
from worker.training.data import IGNORE_INDEX, RowSet


@dataclass
class HostBatch:
    """One micro-batch on the host (pinned when the device is a GPU)."""

    tensors: dict[str, torch.Tensor]
    layout: SegmentLayout | None = None

    def to(self, device: torch.device) -> dict[str, Any]:
        """The model's keyword arguments on ``device``; asynchronous from pinned memory."""
        moved: dict[str, Any] = {
            name: tensor.to(device, non_blocking=True) for name, tensor in self.tensors.items()
        }
        if self.layout is not None:
            moved["layout"] = self.layout.to(device, non_blocking=True)
        return moved


@dataclass
class StepBatch:
    """Everything one optimizer step of one rank needs, prepared ahead."""

    step: int
    micro: list[HostBatch]
    label_tokens: int  # target tokens of the whole step, all ranks (the supervised normaliser)
    real_tokens: int  # non-pad tokens of the whole step, all ranks (throughput, trained_tokens)
    pairs: int = 0  # preference pairs of the whole step, all ranks (the DPO normaliser)


def collate(
    rows: RowSet,
    indices: np.ndarray | list[int],
    pad_id: int,
    *,
    segments: bool,
    packed: bool,
    pin: bool = False,
    reference: np.ndarray | None = None,
) -> HostBatch:
    """Rows ``indices`` right-padded to the longest of them.

    ``segments``: positions restart at 0 in the padding, which is then a segment of its own and
    the layout for segment attention is built. Otherwise packed rows get position ids (transformers
    derives the block-diagonal mask from them) and unpacked rows an attention mask. An empty
    ``indices`` (a rank with no rows left at the end of an epoch) gives row 0 with no targets, so
    the rank still runs the forward and backward that DDP's collectives expect.

    Rows of preference pairs also get, for the DPO loss: ``target_sequence`` (each target's
    sequence in the batch: ``2q`` the chosen answer of the batch's pair ``q``, ``2q + 1`` the
    rejected one), ``pair_ids`` (each batch pair's index in the dataset) and, given the
    precomputed ``reference`` log-probabilities of every sequence, ``reference_logps`` in batch
    order. Such rows always hold several documents, so they always get position ids.
    """
    packed = packed or rows.pairs
    chosen = np.asarray(indices, dtype=np.int64)
    dummy = len(chosen) == 0
    if dummy:
        chosen = np.zeros(1, dtype=np.int64)
    starts = rows.offsets[chosen]
    lengths = rows.offsets[chosen + 1] - starts
    width = int(lengths.max())
    count = len(chosen)
    ids = np.full((count, width), pad_id, dtype=np.int64)
    targets = np.full((count, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (count, 1))
    mask = np.zeros((count, width), dtype=np.int64)
    for r, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        stop = start + length
        ids[r, :length] = rows.input_ids[start:stop]
        if not dummy:
            targets[r, :length] = rows.targets[start:stop]
        positions[r, :length] = rows.position_ids[start:stop]
        positions[r, length:] = np.arange(width - length)
        mask[r, :length] = 1
    target_index = np.flatnonzero(targets != IGNORE_INDEX)
    tensors = {
        "input_ids": torch.from_numpy(ids),
        "targets": torch.from_numpy(targets),
        "target_index": torch.from_numpy(target_index),
    }
    if rows.sequence_ids is not None:
        tensors.update(_pair_tensors(rows, starts, lengths, width, target_index, reference))
    layout = None
    if segments or packed:
        tensors["position_ids"] = torch.from_numpy(positions)
    else:
        tensors["attention_mask"] = torch.from_numpy(mask)
    if segments:
        layout = build_layout(tensors["position_ids"], torch.device("cpu"))
    if pin:
        tensors = {name: tensor.pin_memory() for name, tensor in tensors.items()}
        layout = layout.pin_memory() if layout is not None else None
    return HostBatch(tensors, layout)


def _pair_tensors(
    rows: RowSet,
    starts: np.ndarray,
    lengths: np.ndarray,
    width: int,
    target_index: np.ndarray,
    reference: np.ndarray | None,
) -> dict[str, torch.Tensor]:
    """Which sequence of the batch each target belongs to, and the batch's pairs (see collate)."""
    assert rows.sequence_ids is not None
    flat = np.full(len(starts) * width, -1, dtype=np.int64)
    for r, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        flat[r * width : r * width + length] = rows.sequence_ids[start : start + length]
    sequence = flat[target_index]  # dataset sequence of every target (none in a dummy batch)
    pair_ids = np.unique(sequence // 2)
    local = np.searchsorted(pair_ids, sequence // 2) * 2 + sequence % 2
    tensors = {
        "target_sequence": torch.from_numpy(local.astype(np.int64)),
        "pair_ids": torch.from_numpy(pair_ids.astype(np.int64)),
    }
    if reference is not None:
        both = (pair_ids[:, None] * 2 + np.arange(2)).reshape(-1)
        tensors["reference_logps"] = torch.from_numpy(reference[both].astype(np.float32))
    return tensors


@dataclass
class StepPrefetcher:
    """Runs ``make(step)`` for ``steps`` in a daemon thread, ``depth`` steps ahead."""

    make: Callable[[int], StepBatch]
    steps: Iterable[int]
    depth: int = 2
    _queue: queue.Queue[StepBatch | BaseException] = field(init=False)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, name="lorafleet-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in self.steps:
                if self._stop.is_set():
                    return
                item = self.make(step)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, raised in the main thread
            while not self._stop.is_set():
                try:
                    self._queue.put(exc, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def next(self, step: int) -> StepBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.step != step:
            raise RuntimeError(f"prefetched step {item.step}, expected {step}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
