"""Preference rows (DPO pairs) in ``shared/datasets.py``: both spellings parse to the same pair,
every broken row is refused naming its line and field, and nothing else escapes the parser.

Property tests (hypothesis): rows are generated, not listed, so the promises hold for any text.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.datasets import (
    PREFERENCE,
    DatasetError,
    Example,
    Limits,
    examples_from_objects,
    summarize,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=30,
).filter(lambda t: t.strip() != "")
roles = st.sampled_from(["system", "user", "developer"])
prompt_messages = st.lists(
    st.builds(lambda r, c: {"role": r, "content": c}, roles, words), min_size=1, max_size=3
)


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def answer_of(example: Example) -> str:
    """The trained text of one side of a pair."""
    if example.messages:
        return "".join(m.content for m in example.messages if m.train)
    return "".join(text for text, trained in example.segments if trained)


def prompt_of(example: Example) -> list[tuple[str, str]] | str:
    if example.messages:
        return [(m.role, m.content) for m in example.messages if not m.train]
    return "".join(text for text, trained in example.segments if not trained)


def dump(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@FAST
@given(prompt_messages, words, words)
def test_openai_rows_keep_prompt_and_answers(prompt: list[dict], good: str, bad: str) -> None:
    row = {
        "input": {"messages": prompt},
        "preferred_output": [assistant(good)],
        "non_preferred_output": [assistant(bad)],
    }
    (example,) = examples_from_objects([row])
    chosen, rejected = example.pair()
    assert example.format == PREFERENCE
    assert (answer_of(chosen), answer_of(rejected)) == (good, bad)
    expected = [(m["role"], m["content"]) for m in prompt]
    assert prompt_of(chosen) == prompt_of(rejected) == expected


@FAST
@given(prompt_messages, words, words)
def test_trl_messages_explicit_and_implicit_prompt_agree(
    prompt: list[dict], good: str, bad: str
) -> None:
    explicit = {"prompt": prompt, "chosen": [assistant(good)], "rejected": [assistant(bad)]}
    implicit = {"chosen": [*prompt, assistant(good)], "rejected": [*prompt, assistant(bad)]}
    openai = {
        "input": {"messages": prompt},
        "preferred_output": [assistant(good)],
        "non_preferred_output": [assistant(bad)],
    }
    if good == bad:  # no answer left after the shared messages: refused, naming the field
        with pytest.raises(DatasetError, match="line 1: 'chosen'"):
            examples_from_objects([implicit])
        return
    parsed = examples_from_objects([explicit, implicit, openai])
    assert parsed[0] == parsed[1] == parsed[2]


@FAST
@given(st.text(max_size=30), words, words)
def test_trl_strings_train_on_the_answers_only(prompt: str, good: str, bad: str) -> None:
    (example,) = examples_from_objects([{"prompt": prompt, "chosen": good, "rejected": bad}])
    chosen, rejected = example.pair()
    assert chosen.format == rejected.format == "completion"
    assert chosen.segments == ((prompt, False), (good, True))
    assert rejected.segments == ((prompt, False), (bad, True))


# A valid row, then ways to break it, each with the field the error must name.
VALID = {
    "input": {"messages": [{"role": "user", "content": "q"}]},
    "preferred_output": [assistant("good")],
    "non_preferred_output": [assistant("bad")],
}
VALID_TRL = {"prompt": "q", "chosen": "good", "rejected": "bad"}
BREAKAGES: list[tuple[dict[str, Any], str]] = [
    ({**VALID, "preferred_output": []}, "'preferred_output' must be a non-empty list"),
    ({**VALID, "preferred_output": [assistant("a"), assistant("b")]}, "'preferred_output'"),
    ({**VALID, "non_preferred_output": [{"role": "user", "content": "x"}]}, "non_preferred"),
    ({**VALID, "non_preferred_output": [assistant("  ")]}, "'non_preferred_output' has no"),
    ({k: v for k, v in VALID.items() if k != "input"}, "'input' is missing"),
    ({**VALID, "input": {"messages": []}}, "'input.messages' must be a non-empty list"),
    ({**VALID, "input": {"messages": [{"role": "pirate", "content": "x"}]}}, "input.messages[0]"),
    ({**VALID, "input": "q"}, "'input' must be an object"),
    ({**VALID, "preferred_output": [{"role": "assistant", "content": 3}]}, "content"),
    ({k: v for k, v in VALID_TRL.items() if k != "rejected"}, "'rejected' is missing"),
    ({**VALID_TRL, "chosen": ""}, "'chosen' is empty"),
    ({**VALID_TRL, "rejected": [assistant("x")]}, "'rejected' must be a string"),
    ({**VALID_TRL, "prompt": None}, "'prompt' must be a string"),
    ({"chosen": "a", "rejected": "b"}, "'prompt' is missing"),
    ({"prompt": "q", "chosen": [assistant("a")], "rejected": [assistant("b")]}, "'prompt' must"),
    ({"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "'prompt' must"),
    ({"messages": [{"role": "user", "content": "q"}, assistant("a")]}, "row is chat"),
]


@FAST
@given(
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=0, max_value=6),
    st.sampled_from(range(len(BREAKAGES))),
    st.booleans(),
)
def test_a_broken_row_is_refused_at_its_line(
    before: int, after: int, which: int, openai_first: bool
) -> None:
    broken, field = BREAKAGES[which]
    if "messages" in broken:  # a row of another format is refused after line 1 decided
        before = max(before, 1)
    good = VALID if openai_first else VALID_TRL
    rows = [good] * before + [broken] + [good] * after
    with pytest.raises(DatasetError) as caught:
        summarize(io.BytesIO(dump(rows)))
    assert caught.value.line == before + 1
    assert str(caught.value).startswith(f"line {caught.value.line}: ")
    assert field in str(caught.value)


@FAST
@given(st.lists(st.sampled_from([VALID, VALID_TRL]), min_size=1, max_size=20))
def test_both_spellings_make_one_preference_file(rows: list[dict[str, Any]]) -> None:
    summary = summarize(io.BytesIO(dump(rows)))
    assert (summary.format, summary.rows) == ("preference", len(rows))


preference_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "input",
                    "messages",
                    "preferred_output",
                    "non_preferred_output",
                    "prompt",
                    "chosen",
                    "rejected",
                    "role",
                    "content",
                    "weight",
                    "type",
                    "text",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=24,
)


@FAST
@given(st.lists(preference_values, min_size=1, max_size=6))
def test_arbitrary_preference_shaped_json_only_raises_dataset_errors(rows: list[Any]) -> None:
    try:
        summary = summarize(io.BytesIO(dump(rows)), Limits(max_line_bytes=1 << 16))
    except DatasetError as exc:
        assert exc.line >= 0 and str(exc)
        return
    assert summary.rows == len(rows)
