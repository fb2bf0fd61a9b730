"""``lorafleet merge``: an adapter folded into its base model, on the base it was trained on.

The adapter's ``manifest.json`` names the base (``base_model.name``) and fingerprints it (config,
the weight files' names and sizes, and sampled blocks of their bytes,
``worker.training.manifest.model_fingerprint``). Merging
onto another model of the same shape "works" and produces garbage; so the base is found from the
manifest, fingerprinted again here, and a mismatch is refused unless ``--force``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cli.http import CliError
from shared.config import get_settings


def _manifest(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise CliError(f"adapter {adapter}: no such folder (give the unpacked adapter folder)")
    if not (adapter / "adapter_config.json").is_file():
        raise CliError(f"adapter {adapter}: no adapter_config.json (not a peft adapter folder)")
    path = adapter / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CliError(f"{path}: not JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def resolve_base(name: str) -> str:
    """A base model name as the user means it: a models-dir folder, a local path, or a hub id."""
    folder = get_settings().models_path / name
    if folder.is_dir():
        return str(folder.resolve())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def merge_adapter(adapter: Path, out: Path, base_model: str | None, force: bool) -> None:
    """Check the base against the manifest, then merge and save model + tokenizer into ``out``."""
    from worker.training.manifest import model_fingerprint

    manifest = _manifest(adapter)
    recorded = manifest.get("base_model") or {}
    name = base_model or recorded.get("name")
    if not name:
        raise CliError(
            f"adapter {adapter}: its manifest names no base model; pass --base-model NAME_OR_PATH"
        )
    base_path = resolve_base(name)
    if not Path(base_path).is_dir() and "/" not in name:
        raise CliError(
            f"base model {name!r} not found: no folder {get_settings().models_path / name} and "
            "no such path; pass --base-model with the base model's folder"
        )
    expected = recorded.get("fingerprint")
    actual = model_fingerprint(base_path).get("fingerprint")
    if expected and actual and expected != actual and not force:
        raise CliError(
            f"base model {base_path} is not the model the adapter was trained on (fingerprint "
            f"{actual[:12]} != {expected[:12]} in manifest.json); pass the right --base-model, "
            "or --force to merge anyway"
        )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(base_path)
    except OSError as exc:
        raise CliError(f"base model {name!r} could not be loaded: {exc}") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base_path).save_pretrained(str(out))
