"""The architecture's walls, checked on real imports: api/ never loads torch (or the worker),
shared/ never loads api/ or worker/, and the engine knows nothing of HTTP, Celery or the DB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _loaded_after(module: str, forbidden: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", ["api.main", "cli.client"])
def test_api_side_never_imports_torch(module: str) -> None:
    assert _loaded_after(module, ("torch", "transformers", "peft", "worker")) == []


@pytest.mark.parametrize(
    "module", ["shared.services.jobs", "shared.services.runs", "shared.estimate", "shared.storage"]
)
def test_shared_never_imports_api_or_worker(module: str) -> None:
    assert _loaded_after(module, ("api", "worker", "torch")) == []


@pytest.mark.parametrize(
    "module",
    ["worker.training.engine", "worker.training.run", "worker.training.failures"],
)
def test_engine_knows_nothing_of_http_celery_or_database(module: str) -> None:
    loaded = _loaded_after(module, ("fastapi", "celery", "sqlalchemy", "shared.db", "api"))
    assert loaded == []
