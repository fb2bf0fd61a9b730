"""The engine's progress contract: every record a run reports, defined once, with its wire format.

The engine (rank 0) reports through a :class:`Sink` (torchtune's metric-logger shape: one
``log(record)`` method, one implementation per destination). Records cross the process boundary
as JSON lines: :func:`dumps` writes one, :func:`parse` reads one back into the same type. Every
reader (the job runner, ``lorafleet train``'s printer, the service's progress snapshot) consumes
these types; nobody looks at raw dicts or recognises a record by the text of a message.

Adding a metric (e.g. DPO's ``rewards_chosen``) is one field on :class:`Step`: it is serialised,
parsed, stored in the job's progress snapshot and printed without touching any reader. Parsing is
forward compatible: unknown fields are ignored, an unknown record type becomes a warning
:class:`Event` (a newer engine talking to an older runner never breaks a job).

Nothing here imports torch: the API side may read these records too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from shared.spec import DPO_METRICS, EVAL_DPO_METRICS


@dataclass(frozen=True)
class Record:
    """Base of every record; ``kind`` is the ``type`` on the wire."""

    kind: ClassVar[str] = "record"
    time: float = field(default_factory=time.time, kw_only=True)

    def fields(self) -> dict[str, Any]:
        """The record's own fields (without ``time``), as plain JSON-able values."""
        data = dataclasses.asdict(self)
        data.pop("time", None)
        return data


@dataclass(frozen=True)
class Step(Record):
    """One optimizer step done (rank 0, after the loss all-reduce).

    ``evaluated`` says whether ``eval_loss`` (and the ``eval_`` DPO numbers) were measured at
    this step (otherwise they repeat the latest measurement, so a progress view always shows
    one). ``trained_tokens`` is the running total of real (non-padding) tokens trained on, this
    attempt's resume point included. For DPO jobs ``train_loss``/``eval_loss`` are the DPO loss
    and the ``DPO_METRICS`` fields are set (shared.spec); they stay None for supervised jobs.
    """

    kind: ClassVar[str] = "step"
    # The fields the service stores in a job's progress snapshot and metric series.
    SNAPSHOT: ClassVar[tuple[str, ...]] = (
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "eval_loss",
        "learning_rate",
        "tokens_per_second",
        "eta_seconds",
        *DPO_METRICS,
        *EVAL_DPO_METRICS,
    )

    step: int
    total_steps: int
    epoch: float
    train_loss: float | None
    learning_rate: float | None
    eval_loss: float | None = None
    evaluated: bool = False
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    trained_tokens: int | None = None
    # The gradients' total norm before clipping (None when training.max_grad_norm is null): the
    # same for every strategy and world size, so a wrong gradient reduction shows here first.
    grad_norm: float | None = None
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    eval_rewards_chosen: float | None = None
    eval_rewards_rejected: float | None = None
    eval_reward_accuracy: float | None = None
    eval_reward_margin: float | None = None

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /jobs/{id}/progress`` shows for this step."""
        return {name: getattr(self, name) for name in self.SNAPSHOT}

    def metric_point(self) -> dict[str, Any]:
        """One point of the per-step series: eval numbers only where they were measured."""
        point = self.snapshot()
        if not self.evaluated:
            for name in ("eval_loss", *EVAL_DPO_METRICS):
                point[name] = None
        return point


@dataclass(frozen=True)
class Event(Record):
    """A line for the job's history (``level``: info, warning or error)."""

    kind: ClassVar[str] = "event"
    message: str
    level: str = "info"
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Started(Record):
    """Setup is done and the first step begins: how this run trains (``strategy``: ``ddp`` or
    ``fsdp``, what ``training.strategy`` resolved to on these devices; ``world_size`` ranks)."""

    kind: ClassVar[str] = "started"
    strategy: str
    world_size: int


@dataclass(frozen=True)
class CheckpointSaved(Record):
    """A complete checkpoint folder (renamed into place) at ``path`` after ``step``."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resumed(Record):
    """Training state was restored from a checkpoint; the next step is ``step + 1``."""

    kind: ClassVar[str] = "resumed"
    step: int


@dataclass(frozen=True)
class Preempted(Record):
    """Stopped on request (SIGUSR1) after a checkpoint at ``step``; the ranks exit 75."""

    kind: ClassVar[str] = "preempted"
    step: int


@dataclass(frozen=True)
class Done(Record):
    """The adapter and its manifest are written; the run is complete."""

    kind: ClassVar[str] = "done"
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Error(Record):
    """The run failed. ``code`` ``invalid_job`` is the user's to fix; anything else is ours."""

    kind: ClassVar[str] = "error"
    code: str
    message: str


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (Step, Event, Started, CheckpointSaved, Resumed, Preempted, Done, Error)
}


def dumps(record: Record) -> str:
    """One JSON line (no newline) for ``record``."""
    return json.dumps({"type": record.kind, "time": record.time, **record.fields()}, default=str)


def parse(line: str | bytes) -> Record:
    """The record a line of :func:`dumps` output holds (see the module notes on compatibility)."""
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError("a progress line must be a JSON object")
    kind = raw.pop("type", None)
    cls = RECORD_TYPES.get(str(kind))
    if cls is None:
        return Event(message=f"unknown progress record {kind!r}", level="warning", data=raw)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})


class Sink(Protocol):
    """Where the engine's records go."""

    def log(self, record: Record) -> None:
        """Deliver one record (must not raise for I/O the run can live without)."""


class JsonlSink:
    """Records as JSON lines, flushed per record: a file the launcher tails, or stdout."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    @classmethod
    def to_path(cls, path: str | Path) -> JsonlSink:
        return cls(open(path, "a", buffering=1))  # noqa: SIM115 (lives as long as the run)

    def log(self, record: Record) -> None:
        self._stream.write(dumps(record) + "\n")
        self._stream.flush()


class ListSink:
    """Keeps records in memory (in-process runs, tests, benchmarks)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def log(self, record: Record) -> None:
        self.records.append(record)

    def of(self, cls: type[Record]) -> list[Any]:
        return [r for r in self.records if isinstance(r, cls)]


class NullSink:
    """Drops every record (ranks other than 0)."""

    def log(self, record: Record) -> None:
        return None


class Tail:
    """Reads a growing JSON-lines file written by :class:`JsonlSink`, record by record.

    A partial last line (the writer is mid-write) is kept until its newline arrives.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._position = 0
        self._pending = b""

    def read(self) -> Iterator[Record]:
        """The records completed since the last call."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as stream:
            stream.seek(self._position)
            chunk = stream.read()
        self._position += len(chunk)
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield parse(line)
