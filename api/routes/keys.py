"""``/keys`` (admin): list API keys (never their secrets) and revoke them.

Keys are created on the server host with ``lorafleet keys create`` (the secret is printed once);
listing and revoking also work remotely, so an operator can cut off a leaked key from anywhere.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminKey, SessionDep
from shared.schemas import KeyList, KeyObject
from shared.services import keys as key_service

router = APIRouter(tags=["keys"])


@router.get("/keys", response_model=KeyList)
def list_keys(
    _admin: AdminKey,
    session: SessionDep,
    owner: Annotated[str | None, Query(max_length=200)] = None,
) -> KeyList:
    """Every API key (optionally of one owner), oldest first; revoked ones show ``revoked_at``."""
    rows = key_service.list_keys(session, owner)
    return KeyList(data=[KeyObject.model_validate(r) for r in rows])


@router.post("/keys/{key_id}/revoke", response_model=KeyObject)
def revoke_key(key_id: str, _admin: AdminKey, session: SessionDep) -> KeyObject:
    """Revoke a key at once (its next request answers 401); revoking twice is harmless."""
    return KeyObject.model_validate(key_service.revoke_key(session, key_id))
