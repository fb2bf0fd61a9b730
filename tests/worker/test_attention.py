"""Segment attention and the fused loss compute what transformers' own SDPA path computes.

The reference is the model as transformers runs it (block-diagonal mask from restarting
position_ids, full-vocabulary logits, autograd): loss *and* every LoRA gradient must match, on
Llama (GQA), Qwen2 (q/k/v bias, tied head) and GPT-2 (Conv1D, learned positions).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.spec import LoraSettings
from tests.worker.conftest import write_tiny_qwen2
from worker.training import attention, data
from worker.training.attention import build_layout, plan_buckets, segments_of
from worker.training.model import CausalLMLoss, apply_lora, load_base_model, with_default_targets

QV = ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- pure layout logic
def positions_of(rows: list[list[int]], width: int) -> list[list[int]]:
    """Rows of document lengths -> right-padded position ids (padding restarts at 0)."""
    out = []
    for docs in rows:
        pos = [p for n in docs for p in range(n)]
        out.append(pos + list(range(width - len(pos))))
    return out


rows_strategy = st.lists(
    st.lists(st.integers(1, 60), min_size=1, max_size=6), min_size=1, max_size=4
)


@given(rows_strategy, st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_layout_places_every_token_once(rows: list[list[int]], extra: int) -> None:
    width = max(sum(r) for r in rows) + extra
    positions = positions_of(rows, width)
    layout = build_layout(positions, torch.device("cpu"))
    tokens = len(rows) * width
    # every token is gathered at the slot the scatter says, and nothing else is real
    slots = torch.cat([b.index for b in layout.buckets])
    assert torch.equal(slots[layout.scatter], torch.arange(tokens))
    assert sum(b.count for b in layout.buckets) == len(segments_of(positions))
    # each bucket is a dense [count, length] block of slots
    for b in layout.buckets:
        assert b.index.numel() == b.count * b.length


@given(st.lists(st.integers(1, 2048), min_size=1, max_size=64))
def test_buckets_partition_segments(lengths: list[int]) -> None:
    buckets = plan_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        top = lengths[b[0]]
        assert all(lengths[i] <= top for i in b)
        if top > attention.SHORT_SEGMENT:
            assert all(lengths[i] >= top * attention.BUCKET_RATIO for i in b)


def test_segments_restart_at_position_zero_and_row_start() -> None:
    assert segments_of([[0, 1, 2, 0, 1], [3, 4, 0, 0, 1]]) == [
        (0, 3),
        (3, 2),
        (5, 2),
        (7, 1),
        (8, 2),
    ]


def test_rows_of_unequal_width_are_refused() -> None:
    with pytest.raises(ValueError, match="same width"):
        build_layout([[0, 1], [0]], torch.device("cpu"))


# --------------------------------------------------------------------------- against transformers
def packed_batch(vocab: int, width: int = 48) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Three rows of packed documents with right padding; targets on most real tokens."""
    gen = torch.Generator().manual_seed(0)
    docs = [[20, 9, 13], [31, 5], [7]]
    positions = positions_of(docs, width)
    ids = torch.randint(3, vocab, (len(docs), width), generator=gen)
    targets = torch.randint(3, vocab, (len(docs), width), generator=gen)
    for r, d in enumerate(docs):
        targets[r, sum(d) :] = data.IGNORE_INDEX  # padding
        targets[r, 0] = data.IGNORE_INDEX  # a prompt token
    return ids, targets, positions


def loss_and_grads(
    model_dir: Path, targets_modules: list[str], layout: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    base = load_base_model(str(model_dir))
    if layout:
        assert attention.use_packed_attention(base, 64)
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets_modules)
    peft_model = apply_lora(base, lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    loss_fn = CausalLMLoss(peft_model, chunk_tokens=16)
    assert loss_fn.packed_attention is layout
    ids, targets, positions = packed_batch(base.config.vocab_size)
    kwargs: dict = {"position_ids": torch.tensor(positions)}
    if layout:
        kwargs["layout"] = build_layout(positions, torch.device("cpu"))
    total, count = loss_fn(ids, targets, **kwargs)
    total.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    return float(total) / int(count), grads


@pytest.mark.parametrize(
    ("fixture", "modules"),
    [
        ("tiny_model", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gpt2_model", ["c_attn", "c_proj"]),
        ("qwen2", ["q_proj", "v_proj", "down_proj"]),
    ],
)
def test_segment_attention_matches_transformers_mask(
    fixture: str, modules: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model_dir = (
        write_tiny_qwen2(tmp_path / "q") if fixture == "qwen2" else request.getfixturevalue(fixture)
    )
    ref_loss, ref_grads = loss_and_grads(model_dir, modules, layout=False)
    loss, grads = loss_and_grads(model_dir, modules, layout=True)
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max()) + 1e-12
        assert float((grad - ref_grads[name]).abs().max()) / scale < 1e-4, name


def test_fused_loss_gradient_equals_full_logits_autograd(tiny_model: Path) -> None:
    """The eager head gradient is autograd's, across several chunks."""
    peft_model = apply_lora(
        load_base_model(str(tiny_model)), LoraSettings(r=4, dropout=0.0, target_modules=QV)
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    loss_fn = CausalLMLoss(peft_model, chunk_tokens=7)
    ids, targets, positions = packed_batch(peft_model.config.vocab_size)
    ids, targets = ids[:1, :20], targets[:1, :20]
    total, count = loss_fn(ids, targets)
    total.backward()
    fused = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad()
    logits = peft_model(input_ids=ids, use_cache=False).logits[0]
    keep = targets[0] != data.IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(
        logits[keep].float(), targets[0][keep], reduction="sum"
    )
    reference.backward()
    assert abs(float(total) - float(reference)) < 1e-3
    for name, param in peft_model.named_parameters():
        if param.grad is not None:
            scale = float(param.grad.abs().max()) + 1e-12
            assert float((fused[name] - param.grad).abs().max()) / scale < 1e-4, name


def test_sliding_window_shorter_than_a_row_keeps_transformers_attention(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
    )
    MistralForCausalLM(config).save_pretrained(str(tmp_path / "m"))
    base = load_base_model(str(tmp_path / "m"))
    assert not attention.use_packed_attention(base, 64)
    assert attention.use_packed_attention(base, 16)


@pytest.mark.parametrize("fixture", ["tiny_model", "gpt2_model"])
def test_self_check_passes_on_supported_models(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    base = load_base_model(str(request.getfixturevalue(fixture)))
    assert attention.use_packed_attention(base, 64)
    lora = with_default_targets(base, LoraSettings(r=4))
    loss_fn = CausalLMLoss(apply_lora(base, lora))
    assert loss_fn.segment_attention_error() is None


def test_engine_falls_back_when_segment_attention_disagrees(
    tiny_model: Path, chat_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose attention the segments would get wrong trains with the mask instead."""
    from transformers import AttentionInterface

    from shared.spec import JobSpec
    from worker.training.engine import LoraTrainer, TrainPaths
    from worker.training.events import Event, ListSink

    def leaky(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get(attention.LAYOUT_KWARG) is not None:
            kwargs.pop(attention.LAYOUT_KWARG)
            attention_mask = None  # attends across documents: wrong
        return attention.packed_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    for name in (attention.IMPLEMENTATION, attention.SEGMENTS_ONLY):
        monkeypatch.setitem(AttentionInterface._global_mapping, name, leaky)
    sink = ListSink()
    spec = JobSpec.model_validate(
        {
            "base_model": str(tiny_model),
            "training_file": str(chat_file),
            "training": {"max_steps": 2, "batch_size": 2, "max_seq_length": 128},
        }
    )
    trainer = LoraTrainer(
        spec, TrainPaths(model=str(tiny_model), output_dir=tmp_path / "out"), sink=sink
    )
    trainer.setup()
    assert trainer.packed_attention is False
    assert any("segment attention disabled" in e.message for e in sink.of(Event))
    assert trainer.train() is not None
