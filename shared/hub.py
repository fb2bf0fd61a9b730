"""Does the model hub know this id? Asked at submit, so a typo fails in a second, not on a worker.

A job naming ``meta-llama/Llama-3-8B`` that the hub does not serve used to wait in the queue,
start on a worker and end minutes later in a connection or 404 error. The API asks the hub's
model endpoint (``$HF_ENDPOINT/api/models/<id>``, what ``huggingface_hub`` asks) with a short
timeout (``LORAFLEET_HUB_CHECK_TIMEOUT_SECONDS``):

- the hub answers that the model exists: accepted;
- the hub answers 401/403/404 (unknown, private or gated without access): refused, naming the
  id and what to do;
- the hub cannot be reached (no internet from the API, a proxy, a timeout, a 5xx): accepted; the
  worker checks the id first, before loading anything, and fails in seconds if it cannot get it.

``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) or a timeout of 0 skips the question. The API
sends ``HF_TOKEN`` when it has one, so private models the token can read are accepted.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import quote

import httpx

from shared.config import Settings
from shared.errors import InvalidInput

__all__ = ["check_hub_model", "hub_endpoint"]

log = logging.getLogger(__name__)
DEFAULT_ENDPOINT = "https://huggingface.co"
REFUSED = {
    401: "private or unknown",
    403: "gated or private, and this server's token has no access",
    404: "unknown",
}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def check_hub_model(hub_id: str, settings: Settings) -> None:
    """Raise InvalidInput when the reachable hub says ``hub_id`` does not exist for us."""
    timeout = settings.hub_check_timeout_seconds
    if timeout <= 0 or _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = hub_endpoint()
    url = f"{endpoint}/api/models/{quote(hub_id, safe='/')}"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        log.info("hub not reachable to check %s (%s); the worker will check it", hub_id, exc)
        return
    if response.status_code in REFUSED:
        hint = (
            "check the spelling (org/name as on the hub)"
            if response.status_code == 404 or not token
            else "ask for access on the hub"
        )
        raise InvalidInput(
            f"base_model {hub_id!r}: the model hub ({endpoint}) answers HTTP "
            f"{response.status_code} ({REFUSED[response.status_code]}); {hint}, or for a private "
            "or gated model set HF_TOKEN for the API and the workers; "
            "GET /models lists the models this server has locally",
            param="base_model",
            code="model_not_found",
        )
    if response.status_code >= 400:
        log.info("hub answered %s for %s; the worker will check it", response.status_code, hub_id)
