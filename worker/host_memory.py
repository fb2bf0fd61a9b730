"""How much memory this worker's training processes may use: the host's RAM or its cgroup limit.

Reported at registration (``workers.host_memory_bytes``) so that submission can refuse a CPU job
whose estimate exceeds every worker's memory, as it refuses a GPU job that fits no GPU. In a
container the limit is the cgroup's (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), not the
host's, because that is where the kernel's OOM killer draws the line.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def _physical() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limit() -> int | None:
    for path in CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def host_memory_bytes() -> int | None:
    """The smaller of physical RAM and the cgroup limit (an unlimited cgroup reads huge)."""
    known = [v for v in (_physical(), _cgroup_limit()) if v]
    return min(known) if known else None


OOM_EVENT_FILES = (
    Path("/sys/fs/cgroup/memory.events"),  # v2: "oom_kill N"
    Path("/sys/fs/cgroup/memory/memory.oom_control"),  # v1: "oom_kill N" (kernel >= 4.13)
)


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended in this container's memory cgroup
    so far, or None where the kernel does not say. A rank that died of SIGKILL while this count
    grew was (almost surely) the OOM killer's victim, not an operator's."""
    for path in OOM_EVENT_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
