"""What this worker knows about its GPUs: which ones it owns (UUIDs) and how busy they are.

Live use comes from NVML (``nvidia-ml-py``) when it is importable: memory used by every process
on the device and utilisation, without a CUDA context. Otherwise from torch
(``torch.cuda.mem_get_info``: device-wide memory in use; no utilisation), which creates a CUDA
context in the worker process the first time (a few hundred MB of device memory). On a CPU
worker both lists are empty: nothing is reported rather than something misleading.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lorafleet.gpus")


def _nvml() -> Any | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _normalise(uuid: str) -> str:
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def gpu_uuids() -> list[str]:
    """The UUIDs of the GPUs visible to this process (CUDA_VISIBLE_DEVICES applies)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            _normalise(str(torch.cuda.get_device_properties(i).uuid))
            for i in range(torch.cuda.device_count())
        ]
    except Exception:
        log.exception("could not read GPU UUIDs")
        return []


def gpu_stats(uuids: list[str]) -> list[dict[str, Any]]:
    """Per owned device: index, uuid, memory used/total (bytes), utilisation (percent or None)."""
    if not uuids:
        return []
    nvml = _nvml()
    if nvml is not None:
        stats = []
        for index, uuid in enumerate(uuids):
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                stats.append(
                    {
                        "index": index,
                        "uuid": uuid,
                        "memory_used_bytes": int(memory.used),
                        "memory_total_bytes": int(memory.total),
                        "utilization_percent": float(rates.gpu),
                    }
                )
            except Exception:
                log.debug("NVML could not read %s", uuid, exc_info=True)
        return stats
    try:
        import torch

        stats = []
        for index, uuid in enumerate(uuids):
            free, total = torch.cuda.mem_get_info(index)
            stats.append(
                {
                    "index": index,
                    "uuid": uuid,
                    "memory_used_bytes": int(total - free),
                    "memory_total_bytes": int(total),
                    "utilization_percent": None,
                }
            )
        return stats
    except Exception:
        log.debug("torch could not read GPU memory", exc_info=True)
        return []
