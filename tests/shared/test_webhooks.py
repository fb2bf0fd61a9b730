"""Webhook delivery against a real HTTP receiver on 127.0.0.1 (http.server in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.services import runs, webhooks
from tests.api.live import free_port

SECRET = "s3cret"
LOOPBACK = "127.0.0.1"  # the receivers below listen on loopback, which needs the allow-list
PAYLOAD = {"id": "ftjob-abc", "status": "succeeded", "trained_tokens": 123}


class Receiver:
    """Answers each POST with the next status of ``script`` (the last one repeats)."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                index = min(len(receiver.requests), len(receiver.script)) - 1
                self.send_response(receiver.script[index])
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[[list[int]], Receiver]]:
    made: list[Receiver] = []

    def make(script: list[int]) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_retries_5xx_then_succeeds_with_valid_signature(
    receiver: Callable[[list[int]], Receiver],
) -> None:
    hook = receiver([500, 500, 204])
    waits: list[float] = []
    ok = webhooks.deliver(
        PAYLOAD, hook.url, SECRET, backoff=(0.01, 0.02), sleep=waits.append, allow=LOOPBACK
    )
    assert ok
    assert len(hook.requests) == 3
    assert waits == [0.01, 0.02]
    deliveries = {headers["x-lorafleet-delivery"] for headers, _ in hook.requests}
    assert len(deliveries) == 1, "retries of one delivery share its id (receivers dedupe on it)"
    for headers, body in hook.requests:
        assert headers["x-lorafleet-event"] == "job.succeeded"
        assert headers["content-type"] == "application/json"
        assert webhooks.verify(body, SECRET, headers["x-lorafleet-signature"])
        assert not webhooks.verify(body, "other-secret", headers["x-lorafleet-signature"])
        assert json.loads(body) == PAYLOAD


def test_client_error_is_not_retried(receiver: Callable[[list[int]], Receiver]) -> None:
    hook = receiver([400])
    assert not webhooks.deliver(PAYLOAD, hook.url, SECRET, backoff=(0.0,), allow=LOOPBACK)
    assert len(hook.requests) == 1


def test_429_is_retried(receiver: Callable[[list[int]], Receiver]) -> None:
    hook = receiver([429, 200])
    assert webhooks.deliver(PAYLOAD, hook.url, SECRET, backoff=(0.0,), allow=LOOPBACK)
    assert len(hook.requests) == 2


def test_connection_errors_retry_with_backoff_then_give_up() -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    waits: list[float] = []
    assert not webhooks.deliver(
        PAYLOAD, url, SECRET, attempts=4, sleep=waits.append, allow=LOOPBACK
    )
    assert waits == [0.5, 1.0, 2.0]  # the default schedule; no wait after the last attempt


def test_send_in_background_returns_a_daemon_thread(
    receiver: Callable[[list[int]], Receiver],
) -> None:
    hook = receiver([500, 200])
    thread = webhooks.send_in_background(PAYLOAD, hook.url, SECRET, backoff=(0.01,), allow=LOOPBACK)
    assert thread.daemon
    thread.join(timeout=10)
    assert not thread.is_alive() and len(hook.requests) == 2


def test_notify_final_posts_the_job_object(
    settings: Settings,
    session: Session,
    make_job: Callable[..., Any],
    receiver: Callable[[list[int]], Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "webhook_allow", LOOPBACK)  # create_job checks literal hosts
    hook = receiver([200])
    secret_settings = settings.model_copy(
        update={"webhook_secret": SECRET, "webhook_allow": LOOPBACK}
    )
    job = make_job(webhook_url=hook.url)
    plain = make_job()
    assert webhooks.notify_final(job.id, secret_settings) is None, "not final yet: no webhook"

    for row in (job, plain):
        assert runs.claim_job(session, row.id, "w1", 30) is not None
        assert runs.finish_job(session, runs.Lease(row.id, "w1", 1), "failed", "boom", "it broke")
    assert webhooks.notify_final(plain.id, secret_settings) is None, "no webhook_url"
    thread = webhooks.notify_final(job.id, secret_settings, backoff=(0.01,))
    assert thread is not None
    thread.join(timeout=10)
    headers, body = hook.requests[-1]
    assert headers["x-lorafleet-event"] == "job.failed"
    assert webhooks.verify(body, SECRET, headers["x-lorafleet-signature"])
    payload = json.loads(body)
    assert payload["id"] == job.id and payload["status"] == "failed"
    assert payload["error"] == {"code": "boom", "message": "it broke"}


def test_refused_destination_leaves_an_event_and_sends_nothing(
    settings: Settings,
    session: Session,
    make_job: Callable[..., Any],
    receiver: Callable[[list[int]], Receiver],
) -> None:
    from sqlalchemy import update

    from shared.models import Job
    from shared.services.jobs import list_events

    hook = receiver([200])
    job = make_job()
    # Set after submit, as a host name would be that only resolves to loopback at send time.
    session.execute(update(Job).where(Job.id == job.id).values(webhook_url=hook.url))
    session.commit()
    assert runs.claim_job(session, job.id, "w1", 30) is not None
    assert runs.finish_job(session, runs.Lease(job.id, "w1", 1), "failed", "boom", "it broke")
    thread = webhooks.notify_final(job.id, settings, backoff=(0.0,))
    assert thread is not None
    thread.join(timeout=10)
    assert hook.requests == [], "no allow-list: the loopback receiver gets nothing"
    messages = [e.message for e in list_events(session, "alice", job.id)]
    assert any(m.startswith("webhook not sent:") and "loopback" in m for m in messages), messages
