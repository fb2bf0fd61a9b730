"""Host-side batches: what the collator hands the step, and the prefetch thread's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.training import data
from worker.training.batches import StepBatch, StepPrefetcher, collate


def rows_of(lengths: list[int]) -> data.RowSet:
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    total = int(offsets[-1])
    ids = np.arange(1, total + 1, dtype=np.int32)
    targets = np.where(ids % 3 == 0, data.IGNORE_INDEX, ids).astype(np.int32)
    positions = (np.arange(total) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    return data.RowSet(ids, targets, positions, offsets)


def test_collate_pads_and_precomputes_target_positions() -> None:
    rows = rows_of([5, 3, 7])
    batch = collate(rows, [1, 2], pad_id=0, segments=True, packed=True)
    t = batch.tensors
    assert t["input_ids"].shape == (2, 7) and t["input_ids"].dtype == torch.long
    assert t["input_ids"][0].tolist() == [6, 7, 8, 0, 0, 0, 0]
    assert t["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]  # padding: a segment of its own
    flat = t["targets"].reshape(-1)
    assert torch.equal(t["target_index"], (flat != data.IGNORE_INDEX).nonzero().squeeze(1))
    assert batch.layout is not None and "attention_mask" not in t
    unpacked = collate(rows, [0, 1], pad_id=0, segments=False, packed=False)
    assert unpacked.tensors["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0]
    empty = collate(rows, [], pad_id=0, segments=True, packed=True)
    assert empty.tensors["target_index"].numel() == 0  # a rank with no rows: no targets


def _step(step: int) -> StepBatch:
    if step == 3:
        raise ValueError("bad step")
    return StepBatch(step=step, micro=[], label_tokens=step, real_tokens=step)


def test_prefetcher_yields_in_order_and_raises_in_the_consumer() -> None:
    prefetch = StepPrefetcher(_step, range(0, 5), depth=2)
    try:
        assert [prefetch.next(s).step for s in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad step"):
            prefetch.next(3)
    finally:
        prefetch.close()
