"""Hostile-input guard: refuses what no route could store or look up, before any route runs.

PostgreSQL text cannot hold a NUL character, and no database driver can encode a lone UTF-16
surrogate (JSON allows ``"\\ud800"``). Either one in an id, a query parameter or a job body reached
the database and came back as a 500 from every route that looks something up, on one backend but
not the other. Checking each route's fields would miss the next route; one middleware sees every
request: a bad path answers 404 (no object has such an id), a bad query or JSON body 422, and a
JSON body over ``LORAFLEET_MAX_JSON_BYTES`` 413 before it is held in memory. Multipart uploads are
streamed by their route and not touched here.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from shared.config import get_settings


def unstorable(text: str) -> bool:
    """True when ``text`` holds a NUL or a lone surrogate (nothing a database can store)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_strings_unstorable(value: Any) -> bool:
    # Iterative: a deeply nested body must not turn the check itself into a RecursionError.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if unstorable(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class HostileInputGuard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming responses)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if unstorable(scope.get("path", "")):
            response = error_response(404, "not found", "not_found")
            await response(scope, receive, send)
            return
        query = unquote_plus(scope.get("query_string", b"").decode("latin-1"), errors="replace")
        if "\x00" in query:
            response = error_response(
                422, "query parameters may not contain NUL characters", "invalid_request"
            )
            await response(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(scope):
            await self._json(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _json(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = get_settings().max_json_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                response = error_response(
                    413, f"JSON body is larger than the limit of {limit} bytes", "too_large"
                )
                await response(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None  # not JSON: the route's own parsing answers with its 422
        if parsed is not None and _json_strings_unstorable(parsed):
            response = error_response(
                422,
                "strings in the body may not contain NUL characters or lone surrogates",
                "invalid_request",
                param="body",
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
