"""Names of fine-tuned models: one format, one parser, for every place that shows or reads them.

A succeeded job's adapter is named like OpenAI names fine-tuned models,
``ft:<base>:<owner>:<suffix>:<job id>`` (the suffix part empty when the job has none), and one of
its checkpoints ``ft:<base>:<owner>:<suffix>:<job id>:ckpt-step-<N>``. The job id at the end is
what makes a name resolvable: ``parse_model_name`` finds it (and the step) without trusting the
other parts, which are labels for humans. Owner names are free text, so any character outside
``[A-Za-z0-9._-]`` is shown as ``-`` to keep the colon-separated shape parseable; suffixes are
validated at submit (``shared.spec.SUFFIX_PATTERN``) and need no such care.

Names from before this format, ``<base>:ft-<job id>`` (and ``...:ckpt-step-<N>``), still parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ModelRef", "checkpoint_model_name", "fine_tuned_model_name", "parse_model_name"]

JOB_ID = r"ftjob-[0-9a-f]{24}"
_STEP = r"(?::ckpt-step-(?P<step>\d{1,9}))?"
_CURRENT = re.compile(rf"^ft:(?P<base>[^:]+):[^:]*:[^:]*:(?P<job>{JOB_ID}){_STEP}$")
_LEGACY = re.compile(rf"^(?P<base>[^:]+):ft-(?P<job>{JOB_ID}){_STEP}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ModelRef:
    """What a fine-tuned model name points at: a job's final adapter, or one of its checkpoints."""

    job_id: str
    base_model: str
    step: int | None = None


def _label(text: str | None) -> str:
    return _UNSAFE.sub("-", text or "")


def fine_tuned_model_name(base_model: str, owner: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<owner>:<suffix>:<job id>``: the ``fine_tuned_model`` of a succeeded job."""
    return f"ft:{base_model}:{_label(owner)}:{_label(suffix)}:{job_id}"


def checkpoint_model_name(
    base_model: str, owner: str, suffix: str | None, job_id: str, step: int
) -> str:
    """The name of a job's checkpoint at ``step`` (OpenAI's ``fine_tuned_model_checkpoint``)."""
    return f"{fine_tuned_model_name(base_model, owner, suffix, job_id)}:ckpt-step-{step}"


def parse_model_name(name: str) -> ModelRef | None:
    """The job (and checkpoint step) a fine-tuned model name refers to; None for other names.

    A base model name (``tiny-llama``, ``org/model``) is not a fine-tuned name and gives None.
    Ownership is not checked here: the caller looks the job up under the requesting owner.
    """
    match = _CURRENT.match(name) or _LEGACY.match(name)
    if match is None:
        return None
    step = match.group("step")
    return ModelRef(
        job_id=match.group("job"),
        base_model=match.group("base"),
        step=int(step) if step is not None else None,
    )
