from __future__ import annotations

from pathlib import Path

import pytest

from worker.tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("e2e-models") / "tiny")
