"""The run orchestrator over real rank processes: each way a run can end is an explicit outcome."""

from __future__ import annotations

import time
from pathlib import Path

from tests.worker.test_engine import make_spec
from worker.training import events
from worker.training.run import Outcome, StopRequest, TrainingRun


def _run(tmp: Path, model: Path, data: Path, name: str, **training: object) -> TrainingRun:
    return TrainingRun(
        spec=make_spec(model, data, **training),
        model_path=str(model),
        work_dir=tmp / name / "work",
        out_dir=tmp / name / "out",
        nproc=1,
        checkpoint_dir=tmp / name / "checkpoints",
    )


def test_drain_checkpoints_then_resume_succeeds(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path, tiny_model, chat_file, "a", max_steps=40, batch_size=2)
    seen = events.ListSink()
    started = time.monotonic()

    def drain_after_step_3() -> StopRequest | None:
        return StopRequest.DRAIN if len(seen.of(events.Step)) >= 3 else None

    result = run.run(seen.log, drain_after_step_3)
    assert result.outcome == Outcome.PREEMPTED, result
    assert result.exit_code == 75 and result.last_step is not None and result.last_step >= 3
    saved = seen.of(events.CheckpointSaved)[-1]
    assert saved.step == result.last_step and Path(saved.path).is_dir()
    # The next attempt resumes from that folder and finishes: an explicit success.
    resumed = _run(tmp_path, tiny_model, chat_file, "b", max_steps=40, batch_size=2)
    resumed.resume_from = Path(saved.path)
    again = events.ListSink()
    final = resumed.run(again.log)
    assert final.outcome == Outcome.SUCCEEDED, final
    assert again.of(events.Resumed) == [
        events.Resumed(step=saved.step, time=again.of(events.Resumed)[0].time)
    ]
    assert final.manifest is not None and final.manifest["steps"] == 40
    print(f"\ndrain+resume round trip: {time.monotonic() - started:.1f}s")


def test_cancel_and_lost_end_every_rank(tiny_model: Path, chat_file: Path, tmp_path: Path) -> None:
    for request, outcome in (
        (StopRequest.CANCEL, Outcome.CANCELLED),
        (StopRequest.LOST, Outcome.LOST),
    ):
        run = _run(tmp_path, tiny_model, chat_file, request.value, max_steps=500, batch_size=2)
        seen = events.ListSink()

        def control(s: events.ListSink = seen, r: StopRequest = request) -> StopRequest | None:
            return r if s.of(events.Step) else None

        result = run.run(seen.log, control)
        assert result.outcome == outcome
        assert run.group is not None and all(p.poll() is not None for p in run.group.procs)


def test_user_error_is_a_failed_outcome_with_the_engine_message(
    tiny_model: Path, chat_file: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path, tiny_model, chat_file, "bad", max_steps=2)
    run.spec = run.spec.model_copy(
        update={"lora": run.spec.lora.model_copy(update={"target_modules": ["no_such_proj"]})}
    )
    result = run.run(lambda _r: None)
    assert result.outcome == Outcome.FAILED and result.exit_code == 2
    assert result.error is not None and result.error.code == "invalid_job"
    assert "no_such_proj" in result.error.message
