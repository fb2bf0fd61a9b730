"""API keys: the plaintext is shown once at creation; only its sha256 is stored.

A fast hash (not bcrypt) is right here: the secret is 256 random bits, not a password, so there is
nothing to brute-force, and every request has to look its key up.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.ids import new_key_id
from shared.models import ApiKey, utcnow

KEY_PREFIX = "lf-"


def hash_key(plaintext: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(session: Session, owner: str, admin: bool = False) -> tuple[str, ApiKey]:
    """Create a key for ``owner``; returns (plaintext, row). The plaintext is not kept anywhere."""
    owner = owner.strip()
    if not owner or len(owner) > 200:
        raise ValueError("owner must be 1 to 200 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_key_id(), key_hash=hash_key(plaintext), owner=owner, admin=admin)
    session.add(row)
    session.commit()
    return plaintext, row


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching ``plaintext``, or None (unknown or revoked)."""
    if not plaintext.startswith(KEY_PREFIX):
        return None
    query = select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))
    row = session.scalar(query.execution_options(populate_existing=True))
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key by id; idempotent."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    """Keys (never their secrets), oldest first, optionally of one owner."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query.execution_options(populate_existing=True)))
