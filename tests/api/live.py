"""A live lorafleet for API-level tests (the openai SDK, a browser, webhooks from the worker).

A thin layer over ``tests.e2e.live``: the same real uvicorn server and Celery worker processes,
started on the embedded defaults in one temporary folder with the project's tiny model and an
API key for owner ``t``.

    with live_stack(tmp_path) as live:
        httpx.get(f"{live.url}/jobs", headers=live.headers)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.live import REPO as ROOT
from tests.e2e.live import Deployment, deployment, free_port, wait_for

__all__ = ["ROOT", "Live", "chat_rows", "free_port", "live_stack", "wait_for"]


@dataclass
class Live:
    """A running stack: base URL, key and logs."""

    dep: Deployment

    @property
    def url(self) -> str:
        return self.dep.url

    @property
    def key(self) -> str:
        return self.dep.key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx.Client:
        """An httpx client on the native API, authenticated."""
        return self.dep.client()

    def log_tails(self) -> str:
        names = [f"api-{self.dep.port}", "worker", "inference"]
        return "\n".join(f"--- {name} ---\n{self.dep.log(name)}" for name in names)


@contextlib.contextmanager
def live_stack(base: Path, with_worker: bool = True, **env_overrides: str) -> Iterator[Live]:
    """Tiny model + API server + (optionally) one worker + an API key for owner ``t``."""
    from worker.tiny_models import make_tiny

    model = make_tiny(base / "model-src" / "tiny")
    with deployment(base, {"tiny": model}, **env_overrides) as dep:
        dep.key = dep.create_key("t")
        dep.start_api()
        if with_worker:
            dep.start_worker()
        yield Live(dep)


def chat_rows(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """A small chat dataset the tiny model trains on in a few steps."""
    from worker.tiny_models import sample_chat_rows

    return sample_chat_rows(n, seed=seed)
