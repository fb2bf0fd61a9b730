"""The progress contract: every record survives its wire format; readers tolerate newer engines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from worker.training import events

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
small = st.integers(min_value=0, max_value=10**9)
text = st.text(max_size=40)
plain = st.dictionaries(st.text(max_size=8), st.one_of(small, text, st.none()), max_size=4)

RECORDS = st.one_of(
    st.builds(
        events.Step,
        step=small,
        total_steps=small,
        epoch=finite,
        train_loss=st.none() | finite,
        learning_rate=st.none() | finite,
        eval_loss=st.none() | finite,
        evaluated=st.booleans(),
        tokens_per_second=st.none() | finite,
        eta_seconds=st.none() | finite,
        trained_tokens=st.none() | small,
        grad_norm=st.none() | finite,
        time=finite,
    ),
    st.builds(events.Started, strategy=st.sampled_from(["ddp", "fsdp"]), world_size=small),
    st.builds(events.Event, message=text, level=st.sampled_from(["info", "warning"]), data=plain),
    st.builds(events.CheckpointSaved, step=small, path=text, state=plain),
    st.builds(events.Resumed, step=small),
    st.builds(events.Preempted, step=small),
    st.builds(events.Done, manifest=plain),
    st.builds(events.Error, code=text, message=text),
)


@given(RECORDS)
def test_round_trip(record: events.Record) -> None:
    line = events.dumps(record)
    assert "\n" not in line
    assert events.parse(line) == record


def test_newer_engine_fields_and_types_are_tolerated() -> None:
    line = json.dumps({"type": "resumed", "step": 4, "from_attempt": 2, "time": 1.0})
    assert events.parse(line) == events.Resumed(step=4, time=1.0)
    unknown = events.parse(json.dumps({"type": "gpu_clock", "mhz": 1800}))
    assert isinstance(unknown, events.Event) and unknown.level == "warning"
    assert "gpu_clock" in unknown.message


def test_snapshot_fields_are_step_fields() -> None:
    names = {f.name for f in dataclasses.fields(events.Step)}
    assert set(events.Step.SNAPSHOT) <= names
    step = events.Step(
        step=3, total_steps=9, epoch=0.3, train_loss=1.5, learning_rate=1e-3, eval_loss=2.0
    )
    assert step.snapshot()["eval_loss"] == 2.0
    assert step.metric_point()["eval_loss"] is None  # not measured at this step


def test_tail_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    tail = events.Tail(path)
    assert list(tail.read()) == []  # no file yet
    first, second = events.Resumed(step=1), events.Preempted(step=2)
    line = events.dumps(second)
    path.write_text(events.dumps(first) + "\n" + line[:10])
    assert list(tail.read()) == [first]
    with open(path, "a") as stream:
        stream.write(line[10:] + "\n")
    assert list(tail.read()) == [second]
    sink = events.JsonlSink.to_path(path)
    sink.log(first)
    assert list(tail.read()) == [first]
