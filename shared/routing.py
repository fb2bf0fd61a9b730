"""Which worker may run which job: one rule, used by the claim query and by job submission.

A job states ``resources.gpus`` (a count, or ``"all"``) and optionally ``resources.gpu_type``; a
worker reports its GPU count and type when it registers. The rule:

- ``gpus`` N > 0 needs a worker with at least N GPUs (it trains on N of them);
- ``gpus`` ``"all"`` or 0 fits any worker, CPU workers (0 GPUs) included: "all" means "whatever
  this worker has", which on a CPU worker is ``LORAFLEET_WORKER_PROCS`` processes. A job that
  must not run on a CPU says ``gpus: 1`` (or more);
- ``gpu_type`` must be a case-insensitive substring of the worker's GPU type ("H100" matches
  "NVIDIA H100 80GB HBM3"); a worker with no GPU type (a CPU worker, unless
  ``LORAFLEET_WORKER_GPU_TYPE`` labels it) matches no ``gpu_type``;
- a job of ``resources.nodes`` N > 1 needs N such workers at once: the rule above applies to
  each node, whose GPU count is ``gpus_per_node`` (or ``gpus`` / N).

Pure Python, no database: ``runs.claim_next`` applies the same rule in SQL (and re-checks here),
``jobs.create_job`` applies it to the registered fleet to refuse jobs that could never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.spec import MAX_NODES, JobSpec, Resources

__all__ = ["Capacity", "fits", "no_fit_reason", "node_ranks", "requirements", "split_over_nodes"]


@dataclass(frozen=True)
class Capacity:
    """What one worker can offer a job (as registered in the ``workers`` table)."""

    gpus: int = 0
    gpu_type: str | None = None
    gpu_memory_bytes: int | None = None
    # Memory checks at submit: the host's RAM (CPU workers train in it) and how many training
    # processes share it. None: an older worker that did not report it (no check).
    host_memory_bytes: int | None = None
    procs: int | None = None


def requirements(spec: JobSpec) -> tuple[int, str | None]:
    """The job's routing columns: (gpus_required, gpu_type); 0 GPUs means any worker.

    ``gpus_required`` is per node: what each worker of a gang must have.
    """
    gpu_type = (spec.resources.gpu_type or "").strip() or None
    return spec.resources.node_gpus, gpu_type


def node_ranks(resources: Resources, gpus: int, cpu_procs: int) -> int:
    """How many ranks one node (worker) of a job trains with: every GPU it owns, capped by what
    the job asks per node; on a CPU worker ``LORAFLEET_WORKER_PROCS`` processes."""
    if not gpus:
        return cpu_procs
    wanted = resources.node_gpus
    return min(gpus, wanted) if wanted > 0 else gpus


def split_over_nodes(spec: JobSpec, workers: Sequence[Capacity]) -> JobSpec:
    """A ``gpus`` count larger than any one fitting worker, as the fewest equal nodes.

    ``{"gpus": 16}`` on workers of 8 GPUs becomes ``nodes 2, gpus_per_node 8``; 12 becomes
    2 x 6. Jobs that state ``nodes`` or ``gpus_per_node`` themselves are left as they are,
    and so is any job when no worker has a GPU (nothing to split over).
    """
    res = spec.resources
    if res.nodes != 1 or res.gpus_per_node is not None or not isinstance(res.gpus, int):
        return spec
    _, gpu_type = requirements(spec)
    typed = [w for w in workers if fits(0, gpu_type, w)]
    largest = max((w.gpus for w in typed), default=0)
    if largest <= 0 or res.gpus <= largest:
        return spec
    nodes = next(
        n for n in range(2, res.gpus + 1) if res.gpus % n == 0 and res.gpus // n <= largest
    )
    if nodes > MAX_NODES:  # refused by the fit check, which names the largest worker
        return spec
    resources = res.model_copy(update={"nodes": nodes, "gpus_per_node": res.gpus // nodes})
    return spec.model_copy(update={"resources": resources})


def fits(gpus_required: int, gpu_type: str | None, worker: Capacity) -> bool:
    """Whether a job with these requirements may run on ``worker``."""
    if gpus_required > worker.gpus:
        return False
    if gpu_type is None:
        return True
    return worker.gpu_type is not None and gpu_type.lower() in worker.gpu_type.lower()


def no_fit_reason(
    gpus_required: int, gpu_type: str | None, workers: Sequence[Capacity]
) -> tuple[str, str] | None:
    """Why no worker of ``workers`` fits, as (param, message); None when one does."""
    if any(fits(gpus_required, gpu_type, w) for w in workers):
        return None
    if gpu_type is not None:
        types = sorted({w.gpu_type for w in workers if w.gpu_type})
        typed = [w for w in workers if w.gpu_type and gpu_type.lower() in w.gpu_type.lower()]
        if not typed:
            have = ", ".join(repr(t) for t in types) if types else "none (CPU workers only)"
            return (
                "resources.gpu_type",
                f"resources.gpu_type: no registered worker has a {gpu_type!r} GPU "
                f"(GPU types in the fleet: {have})",
            )
        largest = max(w.gpus for w in typed)
        return (
            "resources.gpus",
            f"resources.gpus: {gpus_required} GPUs requested but the largest {gpu_type!r} "
            f"worker has {largest}",
        )
    largest = max((w.gpus for w in workers), default=0)
    return (
        "resources.gpus",
        f"resources.gpus: {gpus_required} GPUs requested but the largest worker has {largest}",
    )
