"""The adapter's README (a model card) and a portable ``adapter_config.json``.

peft writes an empty template README and records in ``adapter_config.json`` the path the base
model was loaded from, which on a worker is an absolute folder nobody else has. A user who
downloads the adapter should instead read what it is and how to load it, and tools that follow
``base_model_name_or_path`` (``AutoPeftModelForCausalLM``, the Hub) should see the model's public
name, the one the job named.

``finish_adapter`` runs once, on rank 0, after ``manifest.json`` is written (the card is built
from it), and rewrites the manifest so its checksums cover the two files changed here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from worker.training.manifest import MANIFEST, write_manifest

__all__ = ["finish_adapter", "name_base_publicly", "render_card"]

VLLM_DEFAULT_MAX_LORA_RANK = 16


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def render_card(manifest: dict[str, Any]) -> str:
    """The model card text for the adapter described by ``manifest``."""
    base = (manifest.get("base_model") or {}).get("name") or "the base model"
    lora = manifest.get("lora") or {}
    training = manifest.get("training") or {}
    method = (manifest.get("method") or {}).get("type", "supervised")
    rank = int(lora.get("r") or 8)
    rows = [
        ("method", f"{method} fine-tuning, LoRA"),
        (
            "LoRA rank / alpha / dropout",
            f"{lora.get('r')} / {lora.get('alpha')} / {lora.get('dropout')}",
        ),
        ("target modules", _fmt(lora.get("target_modules"))),
        ("steps", _fmt(manifest.get("steps"))),
        (
            "epochs (max_steps wins when set)",
            f"{training.get('epochs')} (max_steps {_fmt(training.get('max_steps'))})",
        ),
        (
            "learning rate, scheduler, warmup",
            f"{_fmt(training.get('learning_rate'))}, "
            f"{training.get('lr_scheduler')}, {training.get('warmup_ratio')}",
        ),
        (
            "batch size per device x processes x accumulation",
            f"{training.get('batch_size')} x {manifest.get('world_size')} x "
            f"{manifest.get('gradient_accumulation_steps')} = {manifest.get('effective_batch')}",
        ),
        (
            "max sequence length, packing",
            f"{training.get('max_seq_length')}, {training.get('packing')}",
        ),
        ("precision, device", f"{manifest.get('precision')}, {manifest.get('device')}"),
        ("seed", _fmt(manifest.get("seed"))),
        ("trained tokens", _fmt(manifest.get("trained_tokens"))),
        ("final train loss", _fmt(manifest.get("final_train_loss"))),
        ("final eval loss", _fmt(manifest.get("final_eval_loss"))),
        ("training data sha256", _fmt(manifest.get("dataset_sha256"))),
        ("validation data sha256", _fmt(manifest.get("validation_sha256"))),
        ("base model fingerprint", _fmt((manifest.get("base_model") or {}).get("fingerprint"))),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    vllm_rank = f" --max-lora-rank {rank}" if rank > VLLM_DEFAULT_MAX_LORA_RANK else ""
    return f"""---
base_model: {base}
library_name: peft
tags:
- lora
- lorafleet
- {method}
---

# LoRA adapter for {base}

Trained by lorafleet with {method} fine-tuning. `manifest.json` beside this file holds the
sha256 of every file, the base model's fingerprint and the full settings.

| setting | value |
| --- | --- |
{table}

## Load with peft

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
tokenizer = AutoTokenizer.from_pretrained("{base}")
```

Merged into the base for plain serving: `lorafleet merge path/to/this/adapter --out merged`
(checks the base model's fingerprint against `manifest.json`).

## Serve with vLLM

```sh
vllm serve {base} --enable-lora --lora-modules adapter=path/to/this/adapter{vllm_rank}
```

then request `"model": "adapter"`.
"""


def name_base_publicly(adapter_dir: Path, name: str | None) -> None:
    """Point ``adapter_config.json``'s ``base_model_name_or_path`` at the job's model name instead
    of the folder this worker loaded it from (checkpoints are served and downloaded too)."""
    config_path = adapter_dir / "adapter_config.json"
    if not name or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    tmp = adapter_dir / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, config_path)


def finish_adapter(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the card, name the base publicly in ``adapter_config.json``; returns the manifest
    rewritten over the final files."""
    name_base_publicly(out_dir, (manifest.get("base_model") or {}).get("name"))
    card = out_dir / "README.md"
    tmp = out_dir / ".README.md.tmp"
    tmp.write_text(render_card(manifest))
    os.replace(tmp, card)
    fields = {k: v for k, v in manifest.items() if k not in ("files", "versions")}
    (out_dir / MANIFEST).unlink(missing_ok=True)
    return write_manifest(out_dir, fields)
