"""When a run checkpoints and how many checkpoints it keeps: the one place that decides.

Every caller (the engine CLI's defaults, ``lorafleet train``, the job runner, which also prunes
storage with it) builds a :class:`CheckpointPolicy`; nothing else holds a cadence or a count.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.spec import JobSpec


@dataclass(frozen=True)
class CheckpointPolicy:
    """``every_steps`` applies when the job body sets no ``training.checkpoint_every_steps``;
    ``keep`` is how many of the newest checkpoints survive (on the run's disk and in storage)."""

    every_steps: int = 50
    keep: int = 3

    @classmethod
    def with_keep(cls, keep: int | None) -> CheckpointPolicy:
        """The default policy, with an operator's ``keep`` (``LORAFLEET_CHECKPOINTS_KEEP``)."""
        return cls(keep=keep) if keep else cls()

    def apply(self, spec: JobSpec) -> JobSpec:
        """``spec`` with the cadence filled in where the job left it out."""
        if spec.training.checkpoint_every_steps is not None:
            return spec
        training = spec.training.model_copy(update={"checkpoint_every_steps": self.every_steps})
        return spec.model_copy(update={"training": training})
