"""Forwarding a completion request to an inference server, streaming the answer through.

The API decides *what* may be answered (``shared.services.inference.resolve_model``); this module
only carries bytes: the OpenAI body as validated, the target's headers and the server's bearer
token out; the answer back as it arrives (server-sent events are relayed chunk by chunk, never
buffered). Failure modes the client must hear about, in OpenAI's error shape:

- no server registered or reachable: 503 ``inference_unavailable`` (the next live server is tried
  first when one refuses the connection);
- the server answers an error: its status and message are passed on;
- the server dies mid-stream: a last ``data: {"error": ...}`` event, so no client waits for a
  ``[DONE]`` that will never come.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shared.config import Settings
from shared.errors import Unavailable
from shared.services.inference import Backend, Target

log = logging.getLogger(__name__)

DONE = b"data: [DONE]"


class InferenceUnavailable(Unavailable):
    """No inference server could take the request."""

    code = "inference_unavailable"


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers={"x-should-retry": "false"})


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _relayed_error(response: httpx.Response) -> JSONResponse:
    raw = await response.aread()
    try:
        error = json.loads(raw)["error"]
        message = str(error.get("message") or raw[:500].decode(errors="replace"))
        return _error(response.status_code, message, error.get("code") or "", error.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw[:500].decode(errors="replace") or response.reason_phrase
        return _error(502, f"the inference server answered {response.status_code}: {text}", "")


async def forward(
    path: str,
    payload: dict[str, Any],
    target: Target,
    backends: list[Backend],
    settings: Settings,
) -> Response:
    """Send ``payload`` to the first backend that takes it; relay its answer."""
    if not backends:
        raise InferenceUnavailable(
            "no inference server is running: start one with `lorafleet inference` (`lorafleet "
            "up` starts one) or set LORAFLEET_INFERENCE_URL",
        )
    timeout = httpx.Timeout(settings.inference_timeout_seconds, connect=5.0)
    client = httpx.AsyncClient(timeout=timeout)
    response: httpx.Response | None = None
    for backend in backends:
        headers = {"Content-Type": "application/json", **target.headers()}
        if backend.token:
            headers["Authorization"] = f"Bearer {backend.token}"
        request = client.build_request(
            "POST", backend.url + path, content=json.dumps(payload), headers=headers
        )
        try:
            response = await client.send(request, stream=True)
            break
        except httpx.TransportError as exc:
            log.warning("inference server %s unreachable: %s", backend.url, exc)
    if response is None:
        await client.aclose()
        raise InferenceUnavailable("no inference server answered; try again shortly")
    if response.status_code != 200:
        try:
            return await _relayed_error(response)
        finally:
            await response.aclose()
            await client.aclose()
    if not payload.get("stream"):
        try:
            body = await response.aread()
        except httpx.HTTPError:
            await client.aclose()
            raise InferenceUnavailable("the inference server stopped while answering") from None
        finally:
            await response.aclose()
        await client.aclose()
        return Response(body, media_type="application/json")
    return StreamingResponse(
        _relay(response, client),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _relay(response: httpx.Response, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
    """The server's events as they come; an error event if it stops before ``[DONE]``."""
    tail = b""
    failed = False  # the server sent an error event of its own
    try:
        async for chunk in response.aiter_raw():
            failed = failed or b'data: {"error"' in tail + chunk
            tail = (tail + chunk)[-64:]
            yield chunk
        if DONE not in tail and not failed:
            yield _sse_error("the inference server ended the answer early")
    except httpx.HTTPError as exc:
        log.warning("inference stream broke: %s", exc)
        yield _sse_error("the inference server stopped while answering; try again")
    finally:
        await response.aclose()
        await client.aclose()
