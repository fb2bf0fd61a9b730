"""Attention for packed rows that costs what each document needs, not what the row holds.

transformers turns restarting ``position_ids`` into a block-diagonal mask, and SDPA then computes
every (query, key) pair of the row, masked or not: a 512-token row holding five 100-token
documents does ~5x the attention work it needs, and on CPU the backward of a masked SDPA was the
most expensive kernel of a training step (a third of it, measured on the 5m benchmark model).

Here a batch is cut into *segments* (each document, and each run of right padding), segments of
similar length are gathered into a few buckets ``[segments, heads, length, dim]``, and each bucket
is one causal SDPA call, whose kernels skip the upper triangle. Shorter segments in a bucket are
padded at their end, so under causal attention no real query ever sees a padded key, and padded
queries are dropped when the outputs are scattered back to token order. Work per layer falls from
``rows x width^2`` to about ``sum(length^2) / 2``, and the same code runs on GPU (SDPA's flash and
memory-efficient kernels take ``is_causal``).

Registered as the transformers attention implementation ``lorafleet_packed``. Without a layout in
the call (generation, tests calling the model directly) it is transformers' own SDPA path, mask
included, so the model stays a normal model.

No mask at all while a layout is in use: transformers builds the attention mask once per forward
in ``create_causal_mask``, for every implementation registered in ``ALL_MASK_ATTENTION_FUNCTIONS``,
before any attention function runs; for packed rows that is the block-diagonal ``batch x seq^2``
boolean mask (256 MiB at 4 x 8192, 16 GiB at 1 x 131072) plus a host-device sync to detect the
packing, all for a mask segment attention never reads. An implementation *absent* from that
registry gets no mask and no packing detection (transformers' own rule for backends that mask
themselves). So the same forward is also registered as ``lorafleet_segments``, with no mask
function, and ``segments_only(config)`` switches the model to it for the duration of a forward
that carries a layout. Gradient checkpointing recomputes a layer later, outside that context, but
with the arguments of the first pass (no mask, the layout): the result is the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPLEMENTATION = "lorafleet_packed"
SEGMENTS_ONLY = "lorafleet_segments"  # the same forward, without a mask function (see above)
LAYOUT_KWARG = "lorafleet_layout"

# A segment joins the current bucket while it is at least this share of the bucket's length. On
# the benchmark data (4 x 512 packed rows) the buckets compute 1.10x the real (query, key) pairs
# in ~4.4 SDPA calls per batch (0.7: 1.17x in 3.8 calls; whole rows, causal: 2.8x).
BUCKET_RATIO = 0.8
# Below this length, segments share one bucket: kernel launch overhead beats the padding saved.
SHORT_SEGMENT = 48


@dataclass(frozen=True)
class Bucket:
    index: torch.Tensor  # [count * length] flat token indices, segment after segment
    count: int
    length: int


@dataclass(frozen=True)
class SegmentLayout:
    """Where every token of a ``[rows, width]`` batch goes in the bucketed attention, and back."""

    buckets: tuple[Bucket, ...]
    scatter: torch.Tensor  # [rows * width]: each token's slot in the concatenated bucket outputs
    rows: int
    width: int
    # [slots]: every bucket's ``index`` concatenated (the token each slot reads), and whether the
    # slot is a real one (True) or padding at the end of a shorter segment (False).
    gather: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    real: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def to(self, device: torch.device, non_blocking: bool = False) -> SegmentLayout:
        """The layout with its index tensors on ``device`` (built on the host, off the main
        thread, then copied: pinned memory makes the copy asynchronous)."""
        return replace(
            self,
            buckets=tuple(
                replace(b, index=b.index.to(device, non_blocking=non_blocking))
                for b in self.buckets
            ),
            scatter=self.scatter.to(device, non_blocking=non_blocking),
            gather=self.gather.to(device, non_blocking=non_blocking),
            real=self.real.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> SegmentLayout:
        return replace(
            self,
            buckets=tuple(replace(b, index=b.index.pin_memory()) for b in self.buckets),
            scatter=self.scatter.pin_memory(),
            gather=self.gather.pin_memory(),
            real=self.real.pin_memory(),
        )


def segments_of(position_ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(flat start, length) of each segment: a new one begins at the row start or at position 0."""
    starts, lengths = _segments(np.asarray(position_ids, dtype=np.int64))
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


def _segments(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, width = positions.shape
    begins = positions == 0
    if width:
        begins[:, 0] = True
    starts = np.flatnonzero(begins)
    ends = np.append(starts[1:], rows * width)
    return starts, ends - starts


def plan_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Group segment indices by length (longest first); see BUCKET_RATIO and SHORT_SEGMENT."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    top = 0
    for i in order:
        length = lengths[i]
        if buckets and (length >= top * BUCKET_RATIO or top <= SHORT_SEGMENT):
            buckets[-1].append(i)
        else:
            buckets.append([i])
            top = length
    return buckets


def build_layout(
    position_ids: torch.Tensor | np.ndarray | Sequence[Sequence[int]], device: torch.device
) -> SegmentLayout:
    """The layout of a right-padded batch whose positions restart at 0 for every document.

    Host work in numpy (no torch op, so nothing a profiler could mistake for device work); the
    index tensors are then moved to ``device``.
    """
    if isinstance(position_ids, torch.Tensor):
        positions = position_ids.to("cpu", torch.long).numpy()
    else:
        if not isinstance(position_ids, np.ndarray) and len({len(p) for p in position_ids}) > 1:
            raise ValueError("every row of a batch must have the same width")
        positions = np.asarray(position_ids, dtype=np.int64)
    rows, width = positions.shape
    starts, lengths = _segments(positions)
    scatter = np.empty(rows * width, dtype=np.int64)
    buckets: list[Bucket] = []
    reals: list[np.ndarray] = []
    offset = 0
    for members in plan_buckets(lengths.tolist()):
        chosen = np.asarray(members)
        first, n = starts[chosen, None], lengths[chosen, None]
        length = int(n[0, 0])
        steps = np.arange(length)
        real = steps < n  # [count, length]
        # Slots past a segment's end read its first token: causally invisible to real queries.
        index = np.where(real, first + steps, first)
        slots = offset + np.arange(len(members) * length).reshape(len(members), length)
        scatter[index[real]] = slots[real]
        reals.append(real.reshape(-1))
        offset += len(members) * length
        buckets.append(
            Bucket(
                index=torch.from_numpy(index.reshape(-1)).to(device),
                count=len(members),
                length=length,
            )
        )
    gather = torch.cat([b.index for b in buckets]) if buckets else torch.zeros(0, dtype=torch.long)
    return SegmentLayout(
        buckets=tuple(buckets),
        scatter=torch.from_numpy(scatter).to(device),
        rows=rows,
        width=width,
        gather=gather.to(device),
        real=torch.from_numpy(np.concatenate(reals) if reals else np.zeros(0, bool)).to(device),
    )


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a gather as well, ``grad[inverse]``
    (zeroed where ``keep`` is False), instead of autograd's index_add.

    Exact for the two gathers of segment attention: tokens -> bucket slots (``inverse`` = each
    token's real slot; a padding slot re-reads its segment's first token, and its gradient is
    exactly zero: under causal attention no real query sees it, and padded queries get no output
    gradient) and bucket slots -> tokens (``inverse`` = each slot's token, ``keep`` = the real
    slots, since padded slots' outputs are dropped). Why: torch's CPU index_add (the plain
    backward) on 3-D rows was up to 40% of a DPO step's profile with 2 threads on a loaded
    2-core host (5m model, torch 2.13), 25x a gather of the same rows in isolation; with one
    thread on the same host the attention's forward + backward measured ~10% faster this way
    (noisy: min of 12 runs; bench/README.md).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse, keep if keep is not None else inverse.new_zeros(0))
        ctx.has_keep = keep is not None
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inverse, keep = ctx.saved_tensors
        out = grad.index_select(0, inverse)
        if ctx.has_keep:
            out = out * keep.unsqueeze(1).to(out.dtype)
        return out, None, None, None


def _gather_rows(
    x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    return cast(torch.Tensor, _GatherRows.apply(x, index, inverse, keep))


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: [b, heads, s, d] in, [b, s, heads, d] out."""
    layout: SegmentLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        if getattr(getattr(module, "config", None), "_attn_implementation", None) == SEGMENTS_ONLY:
            raise ValueError("segment attention without a layout: no mask was built for this call")
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, heads, s, d = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    if (b, s) != (layout.rows, layout.width):
        raise ValueError(f"layout is for {layout.rows}x{layout.width}, batch is {b}x{s}")
    # Every bucket's slots gathered at once, as 2-D [slots, heads * dim] rows (_GatherRows).
    q = query.transpose(1, 2).reshape(b * s, heads * d)
    k = key.transpose(1, 2).reshape(b * s, kv_heads * d)
    v = value.transpose(1, 2).reshape(b * s, kv_heads * dv)
    q_slots = _gather_rows(q, layout.gather, layout.scatter)
    k_slots = _gather_rows(k, layout.gather, layout.scatter)
    v_slots = _gather_rows(v, layout.gather, layout.scatter)
    groups = heads // kv_heads
    # No mask in these calls, so SDPA's own GQA applies where transformers trusts it (it saves
    # the repeated keys and values; ~8% faster on short buckets on CPU).
    native_gqa = groups > 1 and use_gqa_in_sdpa(None, key, value)
    outputs = []
    # split, not slicing: its backward is one concatenation (a slice's is a zero-filled copy of
    # the whole tensor per bucket).
    sizes = [bucket.count * bucket.length for bucket in layout.buckets]
    for bucket, qs, ks, vs in zip(
        layout.buckets,
        q_slots.split(sizes),
        k_slots.split(sizes),
        v_slots.split(sizes),
        strict=True,
    ):
        shape = (bucket.count, bucket.length)
        qb = qs.view(*shape, heads, d).transpose(1, 2)
        kb = ks.view(*shape, kv_heads, d).transpose(1, 2)
        vb = vs.view(*shape, kv_heads, dv).transpose(1, 2)
        if groups > 1 and not native_gqa:
            kb = kb.repeat_interleave(groups, dim=1)
            vb = vb.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            qb, kb, vb, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=native_gqa
        )
        outputs.append(out.transpose(1, 2).reshape(bucket.count * bucket.length, heads * dv))
    merged = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    tokens = _gather_rows(merged, layout.scatter, layout.gather, layout.real)
    return tokens.view(b, s, heads, dv), None


AttentionInterface.register(IMPLEMENTATION, packed_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
AttentionInterface.register(SEGMENTS_ONLY, packed_attention_forward)  # and no mask function


@contextlib.contextmanager
def segments_only(config: Any) -> Iterator[None]:
    """While inside, a model on segment attention gets no attention mask built (see above)."""
    previous = config._attn_implementation
    if previous != IMPLEMENTATION:
        yield
        return
    config._attn_implementation = SEGMENTS_ONLY
    try:
        yield
    finally:
        config._attn_implementation = previous


def use_packed_attention(model: PreTrainedModel, max_seq_length: int) -> bool:
    """Switch a causal LM to segment attention where that is exactly what SDPA would compute.

    Only models that run plain SDPA qualify: no sliding window shorter than a row, no logit
    soft-capping, no attention sinks (their attention is not SDPA's to begin with).
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(config, "sliding_window", None)
    if (
        window is not None
        and getattr(config, "use_sliding_window", True)
        and window < max_seq_length
    ):
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    model.set_attn_implementation(IMPLEMENTATION)
    return True
