"""API keys: only hashes stored; revoked keys stop working."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey
from shared.services.keys import authenticate, create_key, hash_key, revoke_key


def test_create_authenticate_revoke(session: Session) -> None:
    plaintext, row = create_key(session, "alice", admin=True)
    assert plaintext.startswith("lf-") and len(plaintext) > 40
    stored = session.scalars(select(ApiKey)).one()
    assert stored.key_hash == hash_key(plaintext) and plaintext not in stored.key_hash
    key = authenticate(session, plaintext)
    assert key is not None and key.owner == "alice" and key.admin
    assert authenticate(session, plaintext + "x") is None
    assert authenticate(session, "nope") is None
    revoke_key(session, row.id)
    assert authenticate(session, plaintext) is None
