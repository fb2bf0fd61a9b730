"""Webhooks: when a job reaches a final state, POST it to the job's ``webhook_url``.

The body is the native job object as JSON. Receivers verify ``X-Lorafleet-Signature: sha256=<hex
HMAC-SHA256 of the raw body>`` keyed with ``LORAFLEET_WEBHOOK_SECRET`` (compare with
``hmac.compare_digest``), switch on ``X-Lorafleet-Event: job.<status>``, and may deduplicate on
``X-Lorafleet-Delivery``, which stays the same across the retries of one delivery.

Where a webhook may go is decided at send time by ``shared.webhook_guard``: public addresses
only, unless ``LORAFLEET_WEBHOOK_ALLOW`` lists the host or network; redirects are never followed.
A refused destination is not retried, and the job gets an event saying why.

Delivery is at-least-once within a bounded effort: connection errors, timeouts, 408, 429 and 5xx
are retried with backoff; any other 4xx means the receiver refuses the request as sent, and
retrying it would not help. Delivery runs in a daemon thread so a slow receiver never holds up the
worker's next job; a worker that exits mid-retry drops the remaining attempts (the job's state in
the database stays the truth, and ``GET /jobs/{id}`` answers what a missed webhook would have).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from shared.config import Settings, get_settings
from shared.db import session_scope
from shared.models import Job, JobEvent
from shared.schemas import JobObject
from shared.services import gangs
from shared.states import is_final
from shared.webhook_guard import Allow, WebhookBlocked, parse_allow, resolve_destination

log = logging.getLogger("lorafleet.webhooks")

SIGNATURE_HEADER = "X-Lorafleet-Signature"
EVENT_HEADER = "X-Lorafleet-Event"
DELIVERY_HEADER = "X-Lorafleet-Delivery"
RETRY_STATUSES = frozenset({408, 429})
DEFAULT_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)


def sign(body: bytes, secret: str) -> str:
    """The signature header value for ``body``: ``sha256=<hex hmac>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str) -> bool:
    """Constant-time check of a received signature (what a receiver in Python would do)."""
    return hmac.compare_digest(sign(body, secret), signature)


def _retryable(status: int) -> bool:
    return status >= 500 or status in RETRY_STATUSES


def deliver(
    job_payload: dict[str, Any],
    url: str,
    secret: str,
    attempts: int = 5,
    backoff: Sequence[float] = DEFAULT_BACKOFF,
    timeout: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    allow: Allow | str | None = None,
    on_blocked: Callable[[str], None] | None = None,
) -> bool:
    """POST ``job_payload`` to ``url``, signed; True once the receiver answers 2xx.

    ``backoff[i]`` is the wait after failed attempt ``i`` (the last value repeats). ``allow`` is
    the destination allow-list (default ``LORAFLEET_WEBHOOK_ALLOW``); every attempt resolves and
    checks the host again and connects to the checked address. A refused destination ends the
    delivery at once, reported to ``on_blocked``.
    """
    if allow is None:
        allow = get_settings().webhook_allow
    allowed = parse_allow(allow) if isinstance(allow, str) else allow
    body = json.dumps(job_payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "lorafleet-webhook/1",
        SIGNATURE_HEADER: sign(body, secret),
        EVENT_HEADER: f"job.{job_payload.get('status', 'unknown')}",
        DELIVERY_HEADER: uuid.uuid4().hex,
    }
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            try:
                target = resolve_destination(url, allowed)
            except WebhookBlocked as exc:
                log.warning("webhook not sent: %s", exc)
                if on_blocked is not None:
                    on_blocked(str(exc))
                return False
            try:
                response = client.post(
                    target.pinned_url,
                    content=body,
                    headers={**headers, "Host": target.host_header},
                    extensions={"sni_hostname": target.hostname},
                )
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
                if not _retryable(response.status_code):
                    log.warning("webhook %s refused (%s); not retrying", url, reason)
                    return False
            if attempt < attempts:
                wait = backoff[min(attempt - 1, len(backoff) - 1)] if backoff else 0.0
                log.info(
                    "webhook %s attempt %d failed (%s); retry in %ss", url, attempt, reason, wait
                )
                sleep(wait)
            else:
                log.warning("webhook %s failed after %d attempts (%s)", url, attempts, reason)
    return False


def send_in_background(
    job_payload: dict[str, Any], url: str, secret: str, **kwargs: Any
) -> threading.Thread:
    """``deliver`` in a daemon thread; returns the started thread (join it to wait)."""

    def run() -> None:
        try:
            deliver(job_payload, url, secret, **kwargs)
        except Exception:  # a webhook must never take its caller down
            log.exception("webhook delivery to %s crashed", url)

    thread = threading.Thread(target=run, name="lorafleet-webhook", daemon=True)
    thread.start()
    return thread


def job_payload(job: Job, workers: list[str] | None = None) -> dict[str, Any]:
    """The body a webhook carries: the native job object, as ``GET /jobs/{id}`` returns it
    (``workers``: its members, ``gangs.workers_of``)."""
    shown = JobObject.model_validate(job)
    if workers is not None:
        shown = shown.model_copy(update={"workers": workers})
    return shown.model_dump(mode="json")


def _record_blocked(job_id: str) -> Callable[[str], None]:
    def record(reason: str) -> None:
        try:
            with session_scope() as session:
                message = f"webhook not sent: {reason}"
                session.add(JobEvent(job_id=job_id, level="warning", message=message))
        except Exception:
            log.exception("could not record the refused webhook of job %s", job_id)

    return record


def notify_final(
    job_id: str, settings: Settings | None = None, **kwargs: Any
) -> threading.Thread | None:
    """Send the job's webhook if it has one and is final; returns the delivery thread or None.

    Called by the worker right after it recorded the final state. Never raises.
    """
    settings = settings or get_settings()
    kwargs.setdefault("allow", settings.webhook_allow)
    kwargs.setdefault("on_blocked", _record_blocked(job_id))
    try:
        with session_scope() as session:
            job = session.get(Job, job_id, populate_existing=True)
            if job is None or not job.webhook_url or not is_final(job.status):
                return None
            members = gangs.workers_of(session, [job])[job.id]
            url, payload = job.webhook_url, job_payload(job, members)
    except Exception:
        log.exception("could not load job %s for its webhook", job_id)
        return None
    return send_in_background(payload, url, settings.webhook_secret, **kwargs)
