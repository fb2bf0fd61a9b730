"""OpenAI body → JobSpec translation, and the merged event feed's cursor (real database)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.openai_shapes import FineTuningJobCreate, job_to_openai, spec_from_openai
from shared.services import runs
from shared.services.openai_facade import event_feed


def _spec(**body: Any) -> Any:
    return spec_from_openai(
        FineTuningJobCreate.model_validate({"model": "tiny", "training_file": "file-1", **body})
    )


def test_auto_values_become_defaults() -> None:
    spec = _spec(hyperparameters={"n_epochs": "auto", "batch_size": "auto"})
    assert spec.training.epochs == 1 and spec.training.batch_size == 4
    assert spec.training.learning_rate == pytest.approx(2e-4)
    assert _spec().training.epochs == 1


def test_multiplier_seed_and_method_block_win() -> None:
    spec = _spec(
        hyperparameters={"n_epochs": 9},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}},
        },
        seed=7,
        suffix="x",
    )
    assert spec.training.epochs == 2 and spec.training.seed == 7 and spec.suffix == "x"
    assert spec.training.learning_rate == pytest.approx(1e-4)


def test_lora_and_training_ride_along() -> None:
    spec = _spec(
        hyperparameters={"lora_r": 16, "lora_alpha": 32, "max_steps": 5},
        lora={"target_modules": ["q_proj"]},
        training={"max_seq_length": 128},
        webhook_url="http://127.0.0.1:9/hook",
    )
    assert (spec.lora.r, spec.lora.alpha, spec.lora.target_modules) == (16, 32, ["q_proj"])
    assert spec.training.max_steps == 5 and spec.training.max_seq_length == 128
    assert spec.webhook_url == "http://127.0.0.1:9/hook"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"warp": 1}}, "hyperparameters.warp"),
        ({"surprise": 1}, "surprise"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, None),
    ],
)
def test_bad_bodies_name_the_field(body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(InvalidInput) as caught:
        _spec(**body)
    if param:
        assert caught.value.param == param


def test_job_shape_round_trips(make_job: Callable[..., Any]) -> None:
    job = make_job(training={"max_steps": 2, "learning_rate": 4e-4})
    shaped = job_to_openai(job).model_dump()
    assert shaped["object"] == "fine_tuning.job" and shaped["status"] == "queued"
    assert shaped["hyperparameters"]["learning_rate_multiplier"] == 2.0
    assert shaped["organization_id"] == "alice" and shaped["fine_tuned_model"] is None


def test_event_feed_merges_and_pages_newest_first(
    session: Session, make_job: Callable[..., Any]
) -> None:
    job = make_job()
    runs.claim_job(session, job.id, "w1", 30)
    for step in range(1, 4):
        runs.add_event(session, runs.Lease(job.id, "w1", 1), "info", f"message {step}")
        runs.add_metrics(
            session, runs.Lease(job.id, "w1", 1), [{"step": step, "train_loss": 1.0 / step}]
        )
    _, full, more = event_feed(session, "alice", job.id, limit=100)
    assert not more
    kinds = [
        (i.kind, getattr(i.row, "step", None) or getattr(i.row, "message", None)) for i in full
    ]
    assert kinds[:2] == [("metrics", 3), ("message", "message 3")]
    assert kinds[-1] == ("message", "job created")

    seen: list[tuple[str, int]] = []
    after = None
    while True:
        _, page, more = event_feed(session, "alice", job.id, after=after, limit=2)
        seen.extend((i.kind, i.row.id) for i in page)
        if not more:
            break
        last = page[-1]
        after = f"{'ftevent' if last.kind == 'message' else 'ftmetric'}-{last.row.id}"
    assert seen == [(i.kind, i.row.id) for i in full]

    with pytest.raises(InvalidInput):
        event_feed(session, "alice", job.id, after="ftevent-999999")
