"""The inference server's HTTP side: OpenAI's ``/v1/chat/completions`` and ``/v1/completions``.

It speaks the protocol vLLM speaks, so the API proxies to either the same way. What to load comes
from the API in headers (``shared.services.inference``: base model, adapter storage key and
sha256); the body stays OpenAI's own. Every request needs the bearer token this server
registered, so tenancy is the API's to decide: nobody reaches an adapter around it.

Per request, in a worker thread: render the prompt exactly as training does
(``worker.training.data``), fetch and verify the adapter (``adapters.AdapterStore``) and queue it,
the adapter pinned in the cache until the engine holds it; then the engine thread decodes it with
whatever else is running (``engine.Engine``), and the answer goes back whole or as server-sent
events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from shared.config import Settings
from shared.inference_shapes import ChatCompletionRequest, CompletionRequest
from shared.services import inference as registry
from shared.services.fleet import locate_base_model
from worker.adapter_files import AdapterCorrupt, AdapterError, AdapterMissing
from worker.inference.adapters import AdapterStore
from worker.inference.engine import Engine, Sink, Usage
from worker.inference.engine import Request as Job
from worker.training.data import completion_prompt_ids, generation_prompt_ids

log = logging.getLogger("lorafleet.inference")

_TYPES = {401: "authentication_error", 404: "invalid_request_error"}


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(message: str, code: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: ApiError) -> JSONResponse:
    # A 5xx here (a corrupt adapter, a model that does not load) does not heal by retrying.
    return JSONResponse(
        error_body(exc.message, exc.code, exc.status, exc.param),
        status_code=exc.status,
        headers={"x-should-retry": "false"},
    )


class QueueSink(Sink):
    """Hands the engine thread's output to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    def delta(self, text: str) -> None:
        self._put(("delta", text))

    def finish(self, reason: str, usage: Usage) -> None:
        self._put(("finish", (reason, usage)))

    def fail(self, message: str) -> None:
        self._put(("error", message))


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class Shapes:
    """The OpenAI objects of one answer (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            body = self._envelope("text_completion", [choice])
        body["usage"] = _usage(usage)
        return body

    def chunk(
        self, text: str | None, reason: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(kind, [])
        body["usage"] = _usage(usage)
        return body


def create_app(engine: Engine, store: AdapterStore, settings: Settings, token: str) -> FastAPI:
    """The server's app around a started engine and an adapter store."""
    app = FastAPI(title="lorafleet inference", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _error_response(ApiError(400, message, "invalid_request", param))

    def authorise(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise ApiError(401, "missing or wrong bearer token", "unauthorized")

    secured = [Depends(authorise)]

    def submit(
        headers: Any,
        model: str,
        render: Callable[[Any], list[int]],
        field: str,
        params: Any,
        sink: Sink,
    ) -> Job:
        """Resolve the base model, render the prompt, fetch the adapter and queue the request
        (a worker thread). The adapter stays pinned in the cache until the engine has the
        request, which from then on keeps it from eviction itself (``Engine.in_use``)."""
        base = headers.get(registry.HEADER_BASE) or model
        try:
            where = locate_base_model(base, settings)
        except ValueError:
            raise ApiError(
                404,
                f"model {model!r} is not a base model this server can load (fine-tuned models "
                "are served through the lorafleet API)",
                "model_not_found",
                "model",
            ) from None
        tokenizer, context = engine.tokenizer(base, str(where))
        try:
            prompt = render(tokenizer)
        except Exception as exc:  # a chat template may refuse a conversation (role order...)
            raise ApiError(
                400,
                f"{field}: the model's prompt format refused it: {exc}",
                "invalid_prompt",
                field,
            ) from None
        if context is not None and len(prompt) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens; {base} reads at most {context} "
                "(prompt and answer together)",
                "context_length_exceeded",
                field,
            )
        job = Job(base, str(where), prompt, params, sink)
        adapter_id = headers.get(registry.HEADER_ADAPTER)
        if not adapter_id:
            engine.submit(job)
            return job
        adapter = registry.Adapter(
            adapter_id,
            headers.get(registry.HEADER_KEY, ""),
            headers.get(registry.HEADER_SHA, ""),
            headers.get(registry.HEADER_LAYOUT, "archive"),
        )
        try:
            with store.use(adapter) as path:
                job.adapter, job.adapter_path = adapter_id, path
                engine.submit(job)
        except AdapterMissing as exc:
            raise ApiError(404, str(exc), "model_not_found", "model") from None
        except AdapterCorrupt as exc:
            raise ApiError(500, str(exc), "adapter_corrupt", "model") from None
        except AdapterError as exc:
            raise ApiError(500, str(exc), "adapter_unavailable", "model") from None
        return job

    def queue_sink(body: Any) -> QueueSink:
        sink = QueueSink(asyncio.get_running_loop())
        sink.streaming = bool(body.stream)
        return sink

    async def answer(job: Job, sink: QueueSink, body: Any, chat: bool) -> Any:
        shapes = Shapes(chat, body.model)
        if not body.stream:
            parts: list[str] = []
            while True:
                kind, value = await sink.queue.get()
                if kind == "delta":
                    parts.append(value)
                elif kind == "finish":
                    return shapes.whole("".join(parts), value[0], value[1])
                else:
                    raise ApiError(500, value, "inference_failed")
        return StreamingResponse(
            _stream(job, sink, shapes, body.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", dependencies=secured)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        messages = body.conversation()
        sink = queue_sink(body)
        job = await run_in_threadpool(
            submit,
            request.headers,
            body.model,
            lambda tokenizer: generation_prompt_ids(tokenizer, messages),
            "messages",
            body.params(settings.inference_max_tokens),
            sink,
        )
        return await answer(job, sink, body, chat=True)

    @app.post("/v1/completions", dependencies=secured)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        text = body.text()
        sink = queue_sink(body)
        job = await run_in_threadpool(
            submit,
            request.headers,
            body.model,
            lambda tokenizer: completion_prompt_ids(tokenizer, text),
            "prompt",
            body.params(settings.inference_max_tokens),
            sink,
        )
        return await answer(job, sink, body, chat=False)

    @app.get("/v1/models", dependencies=secured)
    def models() -> dict[str, Any]:
        """The base models loaded right now (what vLLM's /v1/models answers)."""
        names, _adapters = engine.held()
        now = int(time.time())
        data = [
            {"id": n, "object": "model", "created": now, "owned_by": "lorafleet"} for n in names
        ]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness, what is loaded, memory (resident and peak; the GPU's when there is one) and
        the adapter cache on disk."""
        names, adapters = engine.held()
        cache_bytes, cached = store.usage()
        return {
            "status": "ok",
            "base_models": names,
            "adapters": adapters,
            **engine.memory(),
            "adapter_cache_bytes": cache_bytes,
            "adapter_cache_count": cached,
        }

    return app


async def _stream(
    job: Job, sink: QueueSink, shapes: Shapes, include_usage: bool
) -> AsyncIterator[bytes]:
    """The answer as server-sent events; a client that goes away cancels its row."""
    try:
        if shapes.chat:  # OpenAI's first chunk names the role
            yield _sse(shapes.chunk("", role=True))
        while True:
            kind, value = await sink.queue.get()
            if kind == "delta":
                yield _sse(shapes.chunk(value))
            elif kind == "finish":
                reason, usage = value
                final = shapes.chunk(None, reason)
                final["usage"] = _usage(usage)
                yield _sse(final)
                if include_usage:
                    yield _sse(shapes.usage_chunk(usage))
                yield b"data: [DONE]\n\n"
                return
            else:
                yield _sse(error_body(value, "inference_failed", 500))
                return
    finally:
        job.cancelled.set()
