"""``/workers`` and ``/queue`` (admin), ``/estimate``: the fleet, and whether a job fits it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import AdminKey, CurrentOwner, SessionDep, SettingsDep, StorageDep
from shared.schemas import (
    GpuDevice,
    InferenceServerObject,
    QueueEntry,
    QueueList,
    WorkerList,
    WorkerObject,
)
from shared.services import fleet, inference
from shared.services import jobs as job_service
from shared.spec import EstimateRequest

router = APIRouter(tags=["fleet"])


@router.get("/workers", response_model=WorkerList)
def list_workers(_admin: AdminKey, session: SessionDep, settings: SettingsDep) -> WorkerList:
    """Registered workers and inference servers; silent ones (no heartbeat for 3 leases) show as
    ``offline``."""
    return WorkerList(
        data=[
            WorkerObject.model_validate(w).model_copy(
                update={
                    "status": status,
                    "current_job": w.current_job if status != "offline" else None,
                    "devices": [GpuDevice.model_validate(d) for d in w.gpu_stats or []]
                    if status != "offline"
                    else [],
                }
            )
            for w, status in fleet.list_workers(session, settings)
        ],
        inference_servers=[
            InferenceServerObject.model_validate(server).model_copy(
                update={
                    "status": status,
                    "base_models": (server.base_models or []) if status != "offline" else [],
                }
            )
            for server, status in inference.list_inference_servers(session, settings)
        ],
    )


@router.get("/queue", response_model=QueueList)
def queue(
    _admin: AdminKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> QueueList:
    """Every owner's queued jobs in the order workers will take them (admin)."""
    return QueueList(
        data=[
            QueueEntry.model_validate(job).model_copy(update={"position": position})
            for position, job in job_service.queue_overview(session, limit)
        ]
    )


@router.post("/estimate")
def estimate(
    body: EstimateRequest,
    owner: CurrentOwner,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Parameters, per-device memory, steps and ``fits`` of a job body, before submitting it.

    ``fits`` is judged against the largest worker the job may run on: GPU memory on GPU workers,
    RAM (all training processes together) on CPU workers; ``warnings`` lists what submission
    would refuse or what may surprise (e.g. a sequence length beyond the model's positions).
    """
    return fleet.estimate_job(
        session, storage, owner.owner, body.job_spec(), body.training_file, settings
    )
