"""Webhook destinations: the decision on resolved addresses, and the guard at send time.

Only loopback is ever connected to here (traffic to any other address is forbidden on these
machines): private, link-local, metadata and public addresses are judged by ``check_addresses``
alone, which decides on already-resolved addresses and sends nothing.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.services import webhooks
from shared.webhook_guard import (
    WebhookBlocked,
    check_addresses,
    check_webhook_url,
    parse_allow,
    resolve_destination,
)

NOTHING = parse_allow("")

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.9": "private",
    "192.168.1.1": "private",
    "fd12:3456::1": "private",
    "169.254.169.254": "link-local",  # AWS/GCP/Azure metadata
    "fe80::1": "link-local",
    "fd00:ec2::254": "private",  # AWS metadata over IPv6
    "100.64.0.1": "non-public",  # carrier-grade NAT
    "0.0.0.0": "unspecified",
    "224.0.0.251": "multicast",
    "::ffff:169.254.169.254": "link-local",  # IPv4-mapped
    "::ffff:10.0.0.1": "private",
    "2002:a9fe:a9fe::1": "link-local",  # 6to4 wrapping 169.254.169.254
    "64:ff9b::7f00:1": "loopback",  # NAT64 wrapping 127.0.0.1
}
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "1.1.1.1"]


@pytest.mark.parametrize(("address", "kind"), sorted(REFUSED.items()))
def test_internal_addresses_are_refused(address: str, kind: str) -> None:
    with pytest.raises(WebhookBlocked) as refused:
        check_addresses("hooks.example.com", [address], NOTHING)
    assert kind in str(refused.value) and "LORAFLEET_WEBHOOK_ALLOW" in str(refused.value)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    check_addresses("hooks.example.com", [address], NOTHING)


def test_every_resolved_address_must_pass() -> None:
    # A name answering with one public and one private address (a rebinding trick) is refused.
    with pytest.raises(WebhookBlocked, match="10.0.0.7"):
        check_addresses("hooks.example.com", ["93.184.216.34", "10.0.0.7"], NOTHING)
    with pytest.raises(WebhookBlocked, match="no address"):
        check_addresses("hooks.example.com", [], NOTHING)


def test_allow_list_by_network_and_by_host() -> None:
    allow = parse_allow(" 10.0.0.0/8, hooks.internal ,192.168.5.5")
    check_addresses("anything", ["10.200.0.1"], allow)
    check_addresses("anything", ["192.168.5.5"], allow)
    check_addresses("HOOKS.internal.", ["172.16.0.1", "127.0.0.1"], allow)
    with pytest.raises(WebhookBlocked):
        check_addresses("anything", ["192.168.5.6"], allow)
    with pytest.raises(WebhookBlocked):
        check_addresses("other.internal", ["172.16.0.1"], allow)


@given(st.integers(min_value=0, max_value=2**24 - 1))
def test_property_ten_slash_eight_refused_unless_allowed(offset: int) -> None:
    address = str(ipaddress.IPv4Address(0x0A000000 + offset))
    with pytest.raises(WebhookBlocked):
        check_addresses("h", [address], NOTHING)
    check_addresses("h", [address], parse_allow("10.0.0.0/8"))


def test_submit_time_check_judges_literals_only() -> None:
    assert "private address" in (check_webhook_url("http://10.0.0.1/hook", "") or "")
    assert "link-local" in (check_webhook_url("http://169.254.169.254/latest", "") or "")
    assert "loopback" in (check_webhook_url("http://localhost:9/hook", "") or "")
    assert check_webhook_url("http://127.0.0.1:9/hook", "127.0.0.1") is None
    assert check_webhook_url("https://hooks.example.com/x", "") is None  # judged at send time
    assert check_webhook_url(None, "") is None


def test_resolution_pins_the_checked_address() -> None:
    target = resolve_destination("http://localhost:8123/path?q=1", parse_allow("localhost"))
    assert target.address in ("127.0.0.1", "::1")
    assert target.host_header == "localhost:8123" and target.hostname == "localhost"
    assert target.pinned_url.endswith(":8123/path?q=1") and "localhost" not in target.pinned_url
    with pytest.raises(WebhookBlocked, match="not an http"):
        resolve_destination("ftp://localhost/x", NOTHING)


# ----------------------------------------------------------------- send time, loopback only
class Listener:
    """A loopback receiver; ``redirect_to`` makes it answer 302 with that Location."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                else:
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.close()


def test_loopback_blocked_by_default_delivered_when_allowed(listeners: list[Listener]) -> None:
    hook = Listener()
    listeners.append(hook)
    url = f"http://localhost:{hook.port}/hook"
    blocked: list[str] = []
    assert not webhooks.deliver(
        {"status": "succeeded"}, url, "s", allow="", on_blocked=blocked.append
    )
    assert hook.requests == [], "nothing may reach a loopback receiver without the allow-list"
    assert blocked and "loopback" in blocked[0]

    assert webhooks.deliver({"status": "succeeded"}, url, "s", allow="localhost")
    assert webhooks.deliver({"status": "succeeded"}, url, "s", allow="127.0.0.0/8, ::1")
    path, headers = hook.requests[0]
    assert path == "/hook" and headers["host"] == f"localhost:{hook.port}"


def test_redirects_are_never_followed(listeners: list[Listener]) -> None:
    target = Listener()
    bouncer = Listener(redirect_to=f"http://127.0.0.1:{target.port}/inside")
    listeners += [target, bouncer]
    url = f"http://127.0.0.1:{bouncer.port}/hook"
    assert not webhooks.deliver({"status": "failed"}, url, "s", allow="127.0.0.1", backoff=(0.0,))
    assert len(bouncer.requests) == 1, "a 3xx is a refused delivery, not retried"
    assert target.requests == [], "the redirect target was never contacted"
