"""Property tests of the dataset parser (``shared/datasets.py``), which sees every uploaded byte.

Two promises: whatever arrives, the parser answers with a ``DatasetError`` naming the line or a
summary, never another exception (which the API would turn into a 500); and valid rows of every
format come back exactly as written.
"""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.datasets import DatasetError, Limits, iter_examples, summarize

SMALL = Limits(max_rows=50, max_line_bytes=512, max_bytes=16 * 1024)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(data: bytes, limits: Limits = SMALL) -> None:
    try:
        summary = summarize(io.BytesIO(data), limits)
    except DatasetError as exc:
        assert exc.line >= 0 and str(exc)
        if exc.line:
            assert str(exc).startswith(f"line {exc.line}: ")
        return
    assert summary.rows >= 1 and summary.bytes == len(data)


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_dataset_errors(data: bytes) -> None:
    parse(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "messages",
                    "role",
                    "content",
                    "prompt",
                    "completion",
                    "text",
                    "instruction",
                    "input",
                    "output",
                    "weight",
                    "type",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@FAST
@given(st.lists(json_values, min_size=1, max_size=8), st.booleans())
def test_arbitrary_json_lines_only_raise_dataset_errors(rows: list[Any], ascii_only: bool) -> None:
    data = b"".join(
        json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n"
        for r in rows
    )
    parse(data, Limits(max_rows=50, max_line_bytes=1 << 16, max_bytes=1 << 20))


@FAST
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=3))
def test_garbage_after_valid_rows_names_its_line(garbage: bytes, good: int) -> None:
    data = b'{"text": "fine"}\n' * good + garbage.replace(b"\n", b" ") + b"\n"
    try:
        summarize(io.BytesIO(data), SMALL)
    except DatasetError as exc:
        assert exc.line in (0, good + 1)


# Text without NUL and lone surrogates (both refused on purpose, tested elsewhere).
texts = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40
)
nonblank = texts.filter(lambda s: s.strip() != "")
roles = st.sampled_from(["system", "user", "tool", "developer"])


@st.composite
def chat_rows(draw: st.DrawFn) -> dict[str, Any]:
    before = draw(st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), max_size=3))
    answer = {"role": "assistant", "content": draw(nonblank)}
    return {"messages": [*before, answer]}


FORMATS = {
    "chat": chat_rows(),
    "completion": st.fixed_dictionaries({"prompt": texts, "completion": nonblank}),
    "alpaca": st.fixed_dictionaries(
        {"instruction": nonblank, "output": nonblank}, optional={"input": texts}
    ),
    "text": st.fixed_dictionaries({"text": nonblank}),
}


@FAST
@given(
    st.sampled_from(sorted(FORMATS)).flatmap(
        lambda fmt: st.tuples(st.just(fmt), st.lists(FORMATS[fmt], min_size=1, max_size=6))
    ),
    st.booleans(),
)
def test_valid_rows_round_trip(case: tuple[str, list[dict[str, Any]]], ascii_only: bool) -> None:
    fmt, rows = case
    data = b"".join(json.dumps(r, ensure_ascii=ascii_only).encode() + b"\n" for r in rows)
    examples = list(iter_examples(io.BytesIO(data)))
    assert len(examples) == len(rows) and {e.format for e in examples} == {fmt}
    for row, example in zip(rows, examples, strict=True):
        if fmt == "chat":
            got = [{"role": m.role, "content": m.content} for m in example.messages]
            assert got == row["messages"]
            assert [m.train for m in example.messages] == [
                m["role"] == "assistant" for m in row["messages"]
            ]
        elif fmt == "completion":
            assert example.segments == ((row["prompt"], False), (row["completion"], True))
        elif fmt == "alpaca":
            prompt, output = example.segments
            assert output == (row["output"], True) and not prompt[1]
            assert row["instruction"] in prompt[0]
            if row.get("input", "").strip():
                assert row["input"] in prompt[0]
        else:
            assert example.segments == ((row["text"], True),)
