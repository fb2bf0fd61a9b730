"""Failure classification: what is retried, what fails at once, and what the user reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.spec import JobSpec
from worker.job_runner import ranks_for
from worker.training.failures import FailureClass, classify, traceback_tail

TRACEBACK = """\
/venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3204: FutureWarning: old
  warnings.warn(
Traceback (most recent call last):
  File "engine.py", line 600, in main
    trainer.train()
  File "engine.py", line 400, in save_checkpoint
    torch.save(state, path)
OSError: [Errno 28] No space left on device
  warnings.warn(
"""


def test_traceback_tail_skips_warning_noise() -> None:
    tail = traceback_tail(TRACEBACK)
    assert tail.startswith("Traceback") and tail.endswith("No space left on device")
    assert "warnings.warn(" not in tail


def test_user_errors_fail_now() -> None:
    failure = classify(2, "invalid_job", "lora.target_modules: no module q", 0, "")
    assert failure.kind == FailureClass.USER and not failure.retryable
    assert failure.message == "lora.target_modules: no module q"
    oom = classify(1, "training_failed", "OutOfMemoryError: CUDA out of memory", 0, "")
    assert oom.code == "out_of_memory" and "batch_size" in oom.message and not oom.retryable


def test_infrastructure_is_retried_with_the_cause() -> None:
    killed = classify(-9, None, None, 1, "step 3\n")
    assert killed.retryable and killed.code == "rank_killed"
    assert "rank 1 was killed by SIGKILL" in killed.message
    disk = classify(1, "training_failed", "OSError: [Errno 28] No space left", 0, TRACEBACK)
    assert disk.code == "disk_full" and disk.retryable and "No space left" in disk.message
    gloo = classify(1, None, None, 0, "RuntimeError: [Gloo] Connection closed by peer [1]\n")
    assert gloo.code == "collective_failed" and gloo.retryable
    unknown = classify(
        1,
        "training_failed",
        "KeyError: 'x'",
        0,
        "Traceback (most recent call last):\n  File \"a.py\"\nKeyError: 'x'\n",
    )
    assert unknown.retryable and "KeyError" in unknown.message
    for failure in (killed, disk, gloo, unknown):
        assert failure.message.strip() not in {"exit code 1", "exit code -9"}


def test_gpus_zero_means_all_of_the_workers_devices() -> None:
    """resources.gpus 0 and "all" both mean any worker, every device it owns (docs/operators)."""
    spec = {"base_model": "m", "training_file": "f"}
    for value, gpus, cpu, expected in (
        (0, 4, 1, 4),
        ("all", 4, 1, 4),
        (2, 4, 1, 2),
        (8, 4, 1, 4),
        (0, 0, 3, 3),
        ("all", 0, 2, 2),
    ):
        job = JobSpec.model_validate({**spec, "resources": {"gpus": value}})
        assert ranks_for(job, gpus, cpu) == expected, (value, gpus, cpu)


def test_oom_kill_counter_reads_cgroup_v1_and_v2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed rank is reported as out_of_memory when the cgroup's OOM-kill count grew."""
    from worker import host_memory

    v2 = tmp_path / "memory.events"
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    monkeypatch.setattr(host_memory, "OOM_EVENT_FILES", (v2, v1))
    assert host_memory.oom_kills() == 3  # v2 absent: v1 read
    v2.write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n")
    assert host_memory.oom_kills() == 1  # v2 first
    monkeypatch.setattr(host_memory, "OOM_EVENT_FILES", (tmp_path / "none",))
    assert host_memory.oom_kills() is None
    # On this machine the real files answer a number or nothing, never raise.
    monkeypatch.undo()
    assert host_memory.oom_kills() is None or host_memory.oom_kills() >= 0  # type: ignore[operator]
