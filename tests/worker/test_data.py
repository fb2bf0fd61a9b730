"""Tokenisation, loss masks, packing and the batch plan (pure logic, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.datasets import examples_from_objects
from worker.training import data
from worker.training.model import load_tokenizer


def _label_text(tokenizer, tokenized: data.TokenizedExample) -> str:
    ids = [t for t in tokenized.targets if t != data.IGNORE]
    return tokenizer.decode(ids)


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
    tokenized, truncated = data.tokenize_example(tok, example, 512)
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
    text = _label_text(tok, data.tokenize_example(tok, example, 512)[0])
    assert "2 + 2 = 4." not in text and "3 + 3 = 6." in text


def test_chat_without_template_uses_default_format(tiny_plain_model: Path) -> None:
    tok = load_tokenizer(str(tiny_plain_model))
    assert not tok.chat_template
    (example,) = examples_from_objects([CHAT])
    tokenized, _ = data.tokenize_example(tok, example, 512)
    full = tok.decode(tokenized.input_ids)
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
    tokenized, _ = data.tokenize_example(tok, example, 512)
    label = _label_text(tok, tokenized)
    assert answer in label and label.endswith("</s>")
    assert prompt_piece not in label


def test_text_format_trains_on_every_token(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    (example,) = examples_from_objects([{"text": "the quick brown fox"}])
    tokenized, _ = data.tokenize_example(tok, example, 512)
    # every position but the last predicts the next token (BOS is only an input)
    assert tokenized.label_tokens == len(tokenized.input_ids) - 1


def test_truncation_is_counted(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    rows = [{"prompt": "hello", "completion": " world " * 200}, {"prompt": "a", "completion": "b"}]
    tokenized, stats = data.tokenize_all(tok, examples_from_objects(rows), 32)
    assert stats.truncated == 1
    assert all(len(t.input_ids) <= 32 for t in tokenized)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=2, max_value=40), min_size=1, max_size=30))
def test_pack_keeps_every_example_whole(lengths: list[int]) -> None:
    examples = [
        data.TokenizedExample(list(range(100 * i, 100 * i + n)), [1] * (n - 1) + [data.IGNORE])
        for i, n in enumerate(lengths)
    ]
    rows = data.pack(examples, 40, pad_id=0)
    assert all(len(r.input_ids) == 40 for r in rows)
    assert sum(r.real_tokens for r in rows) == sum(lengths)
    assert sum(r.label_tokens for r in rows) == sum(n - 1 for n in lengths)
    for row in rows:  # positions restart at each example; each example is contiguous
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for a, b in zip(starts, starts[1:] + [40], strict=True):
            segment = row.input_ids[a:b]
            if a < row.real_tokens:
                assert segment == list(range(segment[0], segment[0] + len(segment)))


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
                step_rows += plan.slice_for(step, micro, rank)
        assert step_rows == plan.step_rows(step)
        seen += step_rows
    assert sorted(seen) == list(range(rows))


def test_same_global_batch_same_rows_for_any_world_size() -> None:
    one = data.BatchPlan(50, 4, 1, 1, seed=3)
    two = data.BatchPlan(50, 2, 2, 1, seed=3)
    for step in range(one.steps_per_epoch):
        assert one.step_rows(step) == two.step_rows(step)


def test_max_steps_wins_over_epochs() -> None:
    plan = data.BatchPlan(10, 2, 1, 1, 0)
    assert data.total_steps(plan, epochs=3, max_steps=None) == 15
    assert data.total_steps(plan, epochs=3, max_steps=7) == 7
