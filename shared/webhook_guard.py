"""Where a webhook may be sent: never to this network's insides unless an operator says so.

A ``webhook_url`` is chosen by whoever submits a job, and the worker or API that sends it sits
inside the operator's network. Without a guard, a job could make lorafleet POST to the cloud
metadata service (``169.254.169.254``), to a database admin port on ``127.0.0.1`` or to any
private host: server-side request forgery. The rule:

- every address the host name resolves to must be public (``ipaddress``'s ``is_global``, and not
  multicast); loopback, private (RFC 1918, ULA), link-local (which holds the metadata
  services), carrier-grade NAT, reserved and unspecified addresses are refused, including when
  they hide inside an IPv6 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, NAT64 ``64:ff9b::/96``);
- unless ``LORAFLEET_WEBHOOK_ALLOW`` lists the URL's host name (exactly, case-insensitive) or a
  network (CIDR) holding every one of its addresses; empty by default;
- the check runs at send time, on the addresses the request then connects to: the sender
  connects to the checked address itself (``pinned_request``), so a DNS answer that changes
  between check and connect (DNS rebinding) cannot slip through;
- redirects are never followed (a 3xx answer is a failed delivery), so a public receiver cannot
  bounce the request inward.

``check_addresses`` is the decision after resolution, a pure function: tests exercise it on
private, link-local, metadata and public addresses without sending anything.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "Destination",
    "WebhookBlocked",
    "check_addresses",
    "parse_allow",
    "resolve_destination",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookBlocked(Exception):
    """The destination is not allowed; the message names the address and the setting."""


@dataclass(frozen=True)
class Allow:
    """``LORAFLEET_WEBHOOK_ALLOW`` parsed: host names and networks."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]


def parse_allow(value: str | Iterable[str]) -> Allow:
    """Parse a comma list of host names and CIDRs (a bare address is a /32 or /128)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            hosts.add(item.lower().rstrip("."))
    return Allow(frozenset(hosts), tuple(networks))


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _why_internal(address: IPAddress) -> str | None:
    """What kind of non-public address this is, or None for a public one."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = _why_internal(inner)
        return f"{reason} (inside {address})" if reason else None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live here)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved or shared (non-public) address"
    return None


def check_addresses(host: str, addresses: Sequence[str], allow: Allow) -> None:
    """Raise ``WebhookBlocked`` unless every address of ``host`` may be sent to.

    ``addresses`` are what ``host`` resolved to (an IP literal resolves to itself). An allowed
    host name passes whatever it resolves to; otherwise each address must be public or inside an
    allowed network. No address at all is refused too.
    """
    if not addresses:
        raise WebhookBlocked(f"webhook host {host!r} resolved to no address")
    if host.lower().rstrip(".") in allow.hosts:
        return
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        if any(address in network for network in allow.networks):
            continue
        reason = _why_internal(address)
        if reason is not None:
            raise WebhookBlocked(
                f"webhook_url host {host!r} resolves to {address}, {reason}; webhooks go only "
                "to public addresses unless LORAFLEET_WEBHOOK_ALLOW lists the host or network"
            )


@dataclass(frozen=True)
class Destination:
    """A checked webhook target: connect to ``pinned_url`` (the checked address), while the
    request names the original host in its ``Host`` header and TLS SNI/certificate check."""

    url: str
    hostname: str
    host_header: str
    address: str
    pinned_url: str


def resolve_destination(url: str, allow: Allow) -> Destination:
    """Resolve ``url``'s host, check every address, and pin the request to the first one.

    Raises ``WebhookBlocked`` for a refused destination or a URL that is not http(s).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookBlocked(f"webhook_url {url!r} is not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookBlocked(f"webhook host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    check_addresses(host, addresses, allow)
    chosen = addresses[0]
    literal = f"[{chosen}]" if ":" in chosen else chosen
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    pinned = parts._replace(netloc=netloc).geturl()
    return Destination(
        url=url,
        hostname=host,
        host_header=parts.netloc.rsplit("@", 1)[-1],
        address=chosen,
        pinned_url=pinned,
    )


def check_webhook_url(url: str | None, allow: str) -> str | None:
    """Refuse at submit a ``webhook_url`` that can be judged without DNS; returns an error text.

    An IP literal (or ``localhost``) in a refused range would never be delivered: saying so at
    submit beats a silent webhook. Host names are judged at send time only, on what they then
    resolve to (an answer now proves nothing about later).
    """
    if not url:
        return None
    host = (urlsplit(url).hostname or "").lower()
    allowed = parse_allow(allow)
    try:
        literal = [str(ipaddress.ip_address(host))]
    except ValueError:
        literal = ["127.0.0.1"] if host in ("localhost", "localhost.") else []
    if not literal:
        return None
    try:
        check_addresses(host, literal, allowed)
    except WebhookBlocked as exc:
        return str(exc)
    return None
