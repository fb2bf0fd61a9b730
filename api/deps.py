"""Typed dependencies so routes never repeat session, storage or auth lookups."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.errors import Forbidden, Unauthorized
from shared.models import ApiKey
from shared.services.keys import authenticate
from shared.storage import Storage, storage_from_url

LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}

# Declares the bearer scheme in the OpenAPI document (Swagger UI's Authorize button). It never
# refuses by itself (auto_error=False): ``current_owner`` reads the header and words the errors.
bearer = HTTPBearer(auto_error=False, description="API key (`lf-...`).")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_session() -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards."""
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


@lru_cache(maxsize=8)
def _storage(url: str, endpoint_url: str | None) -> Storage:
    return storage_from_url(url, endpoint_url)


def get_storage() -> Storage:
    """The configured storage backend (one client per URL, reused across requests)."""
    settings = get_settings()
    assert settings.storage_url is not None
    return _storage(settings.storage_url, settings.s3_endpoint_url)


def current_owner(
    request: Request, session: Annotated[Session, Depends(get_session)], _bearer: Bearer
) -> ApiKey:
    """The API key of the request (``Authorization: Bearer KEY``); 401 when missing or wrong.

    With auth disabled every request acts as the admin owner "local", and only loopback clients
    are served: a disabled-auth server reachable from the network would be open to anyone.
    """
    if get_settings().auth_disabled:
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            raise Forbidden("authentication is disabled; only loopback clients are served")
        return ApiKey(id="local", key_hash="", owner="local", admin=True)
    authorization = request.headers.get("authorization")
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    key = authenticate(session, token.strip())
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


def require_admin(key: Annotated[ApiKey, Depends(current_owner)]) -> ApiKey:
    """The key, if it is an admin key; 403 otherwise."""
    if not key.admin:
        raise Forbidden("this needs an admin API key")
    return key


def metrics_access(
    request: Request, session: Annotated[Session, Depends(get_session)], bearer_: Bearer
) -> None:
    """Gate for ``/metrics``: an admin key, unless ``LORAFLEET_METRICS_PUBLIC=true``.

    The numbers are fleet-wide (every tenant's job counts, worker and GPU totals), which is
    operator information; a Prometheus scrape config sends the admin key as a bearer token.
    """
    if get_settings().metrics_public:
        return
    require_admin(current_owner(request, session, bearer_))


SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CurrentOwner = Annotated[ApiKey, Depends(current_owner)]
AdminKey = Annotated[ApiKey, Depends(require_admin)]
