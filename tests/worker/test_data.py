"""Tokenisation, loss masks, packing and the batch plan (pure logic, fast).

The batched, numpy tokenisation is checked token for token against a plain per-example reference
(each piece tokenised alone, the span mask by a Python scan of the offsets: the code it replaced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.datasets import Example, examples_from_objects
from worker.tiny_models import sample_chat_rows
from worker.training import data
from worker.training.model import load_tokenizer


def tokenize_one(tokenizer, example: Example, max_seq_length: int) -> tuple[data.Row, bool]:
    tokenized, stats = data.tokenize_examples(tokenizer, [example], max_seq_length)
    if not len(tokenized):
        return data.Row(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)), bool(
            stats.truncated
        )
    rows = data.unpacked_rows(tokenized)
    return rows[0], bool(stats.truncated)


def _label_text(tokenizer, row: data.Row) -> str:
    ids = [int(t) for t in row.targets if t != data.IGNORE_INDEX]
    return tokenizer.decode(ids)


def reference_tokenize(tokenizer, example: Example, max_seq_length: int) -> tuple[list, list]:
    """The per-example tokenisation the batched code replaced (independent reference)."""
    if data.uses_chat_template(tokenizer, example):
        full, spans = data.render_chat(tokenizer, example)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [
            any(s <= start < e for s, e in spans) and end > start
            for start, end in enc["offset_mapping"]
        ]
    else:
        segments = (
            data.plain_chat_segments(example) if example.format == "chat" else example.segments
        )
        ids = data._bos_prefix(tokenizer)
        mask = [False] * len(ids)
        for text, trained in segments:
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            ids += piece
            mask += [trained] * len(piece)
            if trained and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
                mask.append(True)
    if len(ids) > max_seq_length and not any(mask[1:max_seq_length]):
        ids, mask = ids[-max_seq_length:], mask[-max_seq_length:]
    else:
        ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    targets = [ids[t + 1] if mask[t + 1] else data.IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids, targets + [data.IGNORE_INDEX]


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_plain_model"])
def test_batched_tokenisation_equals_per_example_reference(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    rows: list[dict] = sample_chat_rows(40)
    for i in (3, 5):  # a second turn; in row 3 the first answer is not trained
        rows[i]["messages"].append({"role": "user", "content": "And again?"})
        rows[i]["messages"].append({"role": "assistant", "content": "Once more."})
    rows[3]["messages"][2]["weight"] = 0
    examples = examples_from_objects(rows)
    examples += examples_from_objects([{"prompt": "Capital of France?", "completion": " Paris."}])
    examples += examples_from_objects([{"instruction": "Reverse", "input": "", "output": "x"}])
    examples += examples_from_objects([{"text": "the quick brown fox " * 30}])
    tokenized, stats = data.tokenize_examples(tok, examples, 64)
    rows_out = data.unpacked_rows(tokenized)
    kept = 0
    for example in examples:
        ids, targets = reference_tokenize(tok, example, 64)
        if all(t == data.IGNORE_INDEX for t in targets):
            continue
        row = rows_out[kept]
        assert row.input_ids.tolist() == ids
        assert row.targets.tolist() == targets
        kept += 1
    assert kept == len(rows_out) == stats.examples - stats.dropped_no_labels
    assert stats.truncated >= 1


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6."},
    ]
}


def test_chat_template_trains_on_assistant_turns_only(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    assert tok.chat_template
    (example,) = examples_from_objects([CHAT])
    tokenized, truncated = tokenize_one(tok, example, 512)
    assert not truncated
    text = _label_text(tok, tokenized)
    assert "2 + 2 = 4." in text and "3 + 3 = 6." in text
    assert "What is" not in text and "Be brief" not in text
    assert text.count("<|im_end|>") == 2  # the model learns to end its turn


def test_chat_weight_zero_skips_a_turn(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    row = {"messages": [dict(m) for m in CHAT["messages"]]}
    row["messages"][2]["weight"] = 0
    (example,) = examples_from_objects([row])
    text = _label_text(tok, tokenize_one(tok, example, 512)[0])
    assert "2 + 2 = 4." not in text and "3 + 3 = 6." in text


def test_chat_without_template_uses_default_format(tiny_plain_model: Path) -> None:
    tok = load_tokenizer(str(tiny_plain_model))
    assert not tok.chat_template
    (example,) = examples_from_objects([CHAT])
    tokenized, _ = tokenize_one(tok, example, 512)
    full = tok.decode(tokenized.input_ids.tolist())
    assert "User: What is 2 + 2?" in full and "Assistant: 2 + 2 = 4." in full
    label = _label_text(tok, tokenized)
    assert label.replace(" ", "") == "2+2=4.</s>3+3=6.</s>"


@pytest.mark.parametrize(
    ("row", "answer", "prompt_piece"),
    [
        ({"prompt": "Capital of France?", "completion": " Paris."}, "Paris.", "Capital"),
        (
            {"instruction": "Reverse the word", "input": "abc", "output": "cba"},
            "cba",
            "Instruction",
        ),
        ({"instruction": "Say hi", "output": "hi"}, "hi", "Say hi"),
    ],
)
def test_answer_only_loss_for_prompt_formats(
    tiny_model: Path, row: dict, answer: str, prompt_piece: str
) -> None:
    tok = load_tokenizer(str(tiny_model))
    (example,) = examples_from_objects([row])
    tokenized, _ = tokenize_one(tok, example, 512)
    label = _label_text(tok, tokenized)
    assert answer in label and label.endswith("</s>")
    assert prompt_piece not in label


def test_text_format_trains_on_every_token(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    (example,) = examples_from_objects([{"text": "the quick brown fox"}])
    tokenized, _ = tokenize_one(tok, example, 512)
    # every position but the last predicts the next token (BOS is only an input)
    assert tokenized.label_tokens == len(tokenized.input_ids) - 1


def test_truncation_is_counted(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    rows = [{"prompt": "hello", "completion": " world " * 200}, {"prompt": "a", "completion": "b"}]
    tokenized, stats = data.tokenize_examples(tok, examples_from_objects(rows), 32)
    assert stats.truncated == 1
    assert int(tokenized.lengths.max()) <= 32


def tokenized_of(lengths: list[int]) -> data.TokenizedSet:
    ids = np.concatenate([np.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)])
    targets = np.concatenate([np.r_[np.ones(n - 1), data.IGNORE_INDEX] for n in lengths])
    offsets = np.r_[0, np.cumsum(lengths)]
    return data.TokenizedSet(ids.astype(np.int32), targets.astype(np.int32), offsets)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=2, max_value=40), min_size=1, max_size=60))
def test_pack_keeps_every_example_whole(lengths: list[int]) -> None:
    rows = data.pack(tokenized_of(lengths), 40)
    assert all(r <= 40 for r in rows.real_tokens)
    assert int(rows.real_tokens.sum()) == sum(lengths)
    assert int(rows.labels.sum()) == sum(n - 1 for n in lengths)
    seen = []
    for r in range(len(rows)):  # positions restart at each example; each example is contiguous
        row = rows[r]
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for a, b in zip(starts, starts[1:] + [row.real_tokens], strict=True):
            segment = row.input_ids[a:b].tolist()
            assert segment == list(range(segment[0], segment[0] + len(segment)))
            assert row.position_ids[a:b].tolist() == list(range(b - a))
            seen.append(segment[0] // 100)
    assert sorted(seen) == list(range(len(lengths)))
    # any-fit packing never leaves two rows that one row could hold
    real = sorted(rows.real_tokens.tolist())
    assert len(real) < 2 or real[0] + real[1] > 40


def first_fit_decreasing(lengths: list[int], capacity: int) -> int:
    """Rows of the quadratic first-fit-decreasing the engine used before (fill reference)."""
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        for b, space in enumerate(free):
            if space >= n:
                free[b] -= n
                break
        else:
            free.append(capacity - n)
    return len(free)


def test_pack_fills_rows_as_well_as_first_fit_decreasing() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(4.4, 0.8, 5000)).astype(int), 8, 512).tolist()
    rows = data.pack(tokenized_of(lengths), 512)
    assert len(rows) <= first_fit_decreasing(lengths, 512)
    assert data.fill_ratio(rows, 512) > 0.97


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=200),
    batch=st.integers(min_value=1, max_value=8),
    world=st.integers(min_value=1, max_value=4),
    accum=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=10),
)
def test_batch_plan_partitions_each_epoch(
    rows: int, batch: int, world: int, accum: int, seed: int
) -> None:
    plan = data.BatchPlan(rows, batch, world, accum, seed)
    seen: list[int] = []
    for step in range(plan.steps_per_epoch):
        step_rows: list[int] = []
        for micro in range(accum):
            for rank in range(world):
                step_rows += plan.slice_for(step, micro, rank).tolist()
        assert step_rows == plan.step_rows(step).tolist()
        seen += step_rows
    assert sorted(seen) == list(range(rows))


def test_same_global_batch_same_rows_for_any_world_size() -> None:
    one = data.BatchPlan(50, 4, 1, 1, seed=3)
    two = data.BatchPlan(50, 2, 2, 1, seed=3)
    for step in range(one.steps_per_epoch):
        assert one.step_rows(step).tolist() == two.step_rows(step).tolist()


def test_epoch_order_is_cached_and_deterministic() -> None:
    plan = data.BatchPlan(1000, 4, 2, 2, seed=7)
    first = plan.epoch_order(0)
    assert plan.epoch_order(0) is first  # one permutation per epoch, not one per call
    again = data.BatchPlan(1000, 4, 2, 2, seed=7)
    assert np.array_equal(again.step_rows(5), plan.step_rows(5))
    assert not np.array_equal(plan.epoch_order(1), data.BatchPlan(1000, 4, 2, 2, 7).epoch_order(0))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=120),
    batch=st.integers(min_value=1, max_value=6),
    step=st.integers(min_value=0, max_value=200),
)
def test_tokens_before_equals_the_sum_of_steps(rows: int, batch: int, step: int) -> None:
    real = np.random.default_rng(rows).integers(1, 50, rows)
    plan = data.BatchPlan(rows, batch, 1, 2, seed=1)
    by_steps = sum(int(real[plan.step_rows(s)].sum()) for s in range(step))
    assert plan.tokens_before(step, real) == by_steps


def test_max_steps_wins_over_epochs() -> None:
    plan = data.BatchPlan(10, 2, 1, 1, 0)
    assert data.total_steps(plan, epochs=3, max_steps=None) == 15
    assert data.total_steps(plan, epochs=3, max_steps=7) == 7
