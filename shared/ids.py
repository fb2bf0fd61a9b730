"""Public object ids: a type prefix plus 96 random bits, e.g. ``file-3f9c...`` (24 hex digits).

Random rather than sequential so ids leak nothing about volume and cannot be guessed; the prefix
tells a human (and the API) at a glance what kind of object an id names.
"""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``<prefix>-<24 hex digits>``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def new_file_id() -> str:
    """Id of an uploaded dataset file."""
    return new_id("file")


def new_job_id() -> str:
    """Id of a fine-tuning job."""
    return new_id("ftjob")


def new_key_id() -> str:
    """Id of an API key record (never the secret itself)."""
    return new_id("key")
