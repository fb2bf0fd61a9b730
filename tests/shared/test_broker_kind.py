"""One place reads broker URL schemes."""

from __future__ import annotations

import pytest

from shared.queueing import BrokerKind, broker_kind


@pytest.mark.parametrize(
    ("url", "kind", "server"),
    [
        ("redis://127.0.0.1:6379/0", BrokerKind.REDIS, True),
        ("rediss://host:6380/0", BrokerKind.REDIS, True),
        ("amqp://guest@host//", BrokerKind.AMQP, True),
        ("filesystem://", BrokerKind.FILESYSTEM, False),
        ("sqla+sqlite:///x.db", BrokerKind.SQLALCHEMY, False),
        ("", BrokerKind.OTHER, False),
        (None, BrokerKind.OTHER, False),
    ],
)
def test_broker_kind(url: str | None, kind: BrokerKind, server: bool) -> None:
    assert broker_kind(url) == kind
    assert broker_kind(url).has_server is server
