"""Start the engine's ranks as one process group, torchrun-style, from any kind of parent.

Why not ``mp.spawn`` or torchrun's agent: Celery prefork children are daemonic (no children via
multiprocessing), and killing a job must end every rank at once. Plain ``Popen`` with a new
process group led by rank 0 and the others joining it gives one ``killpg`` target (a new
*session* would forbid the others from joining: setpgid across sessions is EPERM); each rank also
asks the kernel for SIGKILL when its parent dies (see engine._die_with_parent).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a rank checkpointed on request (SIGUSR1) and exited


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" : on every interface, as a rendezvous store binds)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's ranks meet the other nodes' ranks: torch's static c10d rendezvous,
    the one ``torchrun --nnodes N --node-rank K --master-addr A --master-port P`` sets up.

    Rank ``rank_offset`` + i of ``world_size`` runs as local rank i; global rank 0 (on node 0)
    hosts the TCPStore at ``master_addr:master_port`` and every other rank connects to it
    (``init_process_group`` with the env:// method). ``run_id`` names the rendezvous
    (job + attempt); each attempt has its own endpoint, so ranks of an older attempt can never
    meet the new one's.
    """

    master_addr: str
    master_port: int
    world_size: int
    rank_offset: int
    node_rank: int
    nnodes: int
    run_id: str


def device_count() -> int:
    """GPUs visible to this process (0 on CPU machines). Imports torch lazily."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class RankGroup:
    """The running ranks of one training run."""

    procs: list[subprocess.Popen[bytes]]
    log_files: list[Path]
    _closed: bool = field(default=False, repr=False)
    _first_failed: int | None = field(default=None, repr=False)

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def poll(self) -> int | None:
        """None while running; else the first non-zero exit code, or 0 when all succeeded.

        When one rank fails the others would hang in a collective: end the whole group.
        """
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            if self._first_failed is None:  # before kill(): the others then die of our SIGKILL
                bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
                # A rank killed by a signal is the cause; peers failing in a collective because
                # it vanished are the consequence, even when they are noticed in the same poll.
                signalled = [i for i in bad if (codes[i] or 0) < 0]
                self._first_failed = (signalled or bad)[0]
            self.kill()
            return codes[self._first_failed]
        if all(c == 0 for c in codes):
            return 0
        return None

    def wait(self, poll_seconds: float = 0.2) -> int:
        while (code := self.poll()) is None:
            time.sleep(poll_seconds)
        return code

    def terminate(self, grace_seconds: float = 5.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after the grace period."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        self.kill()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every rank (e.g. SIGUSR1: checkpoint now and exit)."""
        self._signal(sig)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in self.procs:  # ranks that left the group, if any
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def failed_rank(self) -> int | None:
        """The rank whose failure ended the group (a signal counts), or None."""
        return self._first_failed

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the first failing rank's log (or rank 0's)."""
        order = sorted(
            range(len(self.procs)), key=lambda i: (self.procs[i].returncode in (0, None), i)
        )
        for index in order:
            path = self.log_files[index]
            if path.exists() and path.stat().st_size:
                return path.read_text(errors="replace")[-chars:]
        return ""


def launch(
    spec_path: Path,
    out_dir: Path,
    nproc: int,
    *,
    work_dir: Path,
    model_path: str | None = None,
    progress_file: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    keep_checkpoints: int | None = None,
    cache_dir: Path | None = None,
    init_adapter: Path | None = None,
    extra_env: dict[str, str] | None = None,
    rendezvous: Rendezvous | None = None,
) -> RankGroup:
    """Start ``nproc`` ranks of ``worker.training.engine``; returns at once.

    ``cache_dir``: where the ranks share the prepared data (the engine's ``--cache-dir``); give
    every attempt of a job the same folder so a resume skips the preparation. ``rendezvous``:
    this host's part of a multi-node world (None: the ``nproc`` ranks are the whole world).
    ``init_adapter``: the local folder of ``training.init_adapter`` (the engine's
    ``--init-adapter``), when the spec names it by job or checkpoint.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    args: list[str] = [
        sys.executable,
        "-m",
        "worker.training.engine",
        "--spec",
        str(spec_path),
        "--out",
        str(out_dir),
    ]
    optional: Sequence[tuple[str, object | None]] = (
        ("--model-path", model_path),
        ("--progress-file", progress_file),
        ("--checkpoint-dir", checkpoint_dir),
        ("--resume-from", resume_from),
        ("--cache-dir", cache_dir),
        ("--init-adapter", init_adapter),
        ("--keep-checkpoints", keep_checkpoints),
    )
    for flag, value in optional:
        if value is not None:
            args += [flag, str(value)]
    rdzv = rendezvous or Rendezvous("127.0.0.1", free_port(), nproc, 0, 0, 1, "local")
    # The variables torchrun gives each worker process (torch.distributed.run's static rendezvous).
    base_env = {
        **os.environ,
        **(extra_env or {}),
        "WORLD_SIZE": str(rdzv.world_size),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(rdzv.node_rank),
        "GROUP_WORLD_SIZE": str(rdzv.nnodes),
        "MASTER_ADDR": rdzv.master_addr,
        "MASTER_PORT": str(rdzv.master_port),
        "TORCHELASTIC_RUN_ID": rdzv.run_id,
        "LORAFLEET_PARENT_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for rank in range(nproc):
        env = {**base_env, "RANK": str(rdzv.rank_offset + rank), "LOCAL_RANK": str(rank)}
        log_path = work_dir / f"rank{rank}.log"
        logs.append(log_path)
        with open(log_path, "wb") as log:
            if rank == 0:
                group = 0  # a new process group led by rank 0...
            else:
                group = procs[0].pid  # ...that the other ranks join (same session: allowed)
            proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=group
            )
        procs.append(proc)
    return RankGroup(procs, logs)
