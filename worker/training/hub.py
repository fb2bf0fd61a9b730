"""Is a hub id usable from this worker? Answered in seconds, before any model is loaded.

A job naming a hub model the worker cannot fetch (no network, no such repository, no access)
would otherwise fail after the ranks started and timed out on their downloads. This looks in the
local Hugging Face cache first, then asks the hub for the model's ``config.json`` with a short
timeout.
"""

from __future__ import annotations

HUB_CHECK_TIMEOUT_S = 10.0


def check_hub_model(repo_id: str, timeout: float = HUB_CHECK_TIMEOUT_S) -> str | None:
    """None when ``repo_id`` can be loaded here; otherwise what is wrong and how to fix it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return None
    try:
        hf_hub_download(repo_id, "config.json", etag_timeout=timeout)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return (
            f"base_model {repo_id!r} cannot be resolved from the model hub on this worker "
            f"({type(exc).__name__}: {reason}); put a copy in the models directory "
            f"(LORAFLEET_MODELS_DIR/{repo_id}) or give the worker hub access"
        )
    return None
