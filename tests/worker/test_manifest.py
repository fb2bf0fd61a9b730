"""The base model fingerprint in an adapter's manifest: what ``lorafleet merge`` checks."""

from __future__ import annotations

import shutil
from pathlib import Path

from worker.tiny_models import make_tiny
from worker.training.manifest import model_fingerprint


def test_fingerprint_tells_apart_same_shape_different_weights(tmp_path: Path) -> None:
    """Two models of one architecture (same config, names and sizes: a base and its fine-tuned
    variant) get different fingerprints; a copy of a model gets the same one."""
    first = make_tiny(tmp_path / "a", seed=0)
    second = make_tiny(tmp_path / "b", seed=1)
    assert (first / "config.json").read_bytes() == (second / "config.json").read_bytes()
    weights = sorted(p.name for p in first.glob("*.safetensors"))
    assert weights and all(
        (first / n).stat().st_size == (second / n).stat().st_size for n in weights
    )
    copy = Path(shutil.copytree(first, tmp_path / "copy"))
    print_a = model_fingerprint(str(first))["fingerprint"]
    assert print_a is not None
    assert print_a != model_fingerprint(str(second))["fingerprint"]
    assert print_a == model_fingerprint(str(copy))["fingerprint"]
    assert model_fingerprint("org/hub-model")["fingerprint"] is None  # not local: the revision
