"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``: call what was trained.

Thin: the body is validated by ``shared.inference_shapes``, the model name resolved for the caller
by ``shared.services.inference`` (tenancy: another owner's model is ``model_not_found``), and the
request forwarded by ``api.proxy`` to an inference server, streamed through. Errors come out in
OpenAI's shape (``OpenAIRoute``). Registered before the ``/v1`` facade's catch-all route.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentOwner, SessionDep, SettingsDep
from api.openapi import error_body
from api.proxy import forward
from api.routes.openai_compat import OpenAIRoute
from shared.config import Settings
from shared.inference_shapes import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    ModelObject,
)
from shared.services import inference

router = APIRouter(prefix="/v1", tags=["inference"], route_class=OpenAIRoute)

MODEL = "ft:tiny-llama:alice::ftjob-0123456789abcdef01234567"


def _doc(status: int, code: str, message: str, description: str) -> dict[str, Any]:
    example = error_body(status, code, message, "model", openai=True)
    content = {"schema": {"$ref": "#/components/schemas/Error"}, "example": example}
    return {"description": description, "content": {"application/json": content}}


ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (`application/json`), or with `stream: true` server-sent "
        "chunks ending with `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    404: _doc(
        404,
        "model_not_found",
        f"model {MODEL!r} does not exist or is not yours",
        "No such model of yours (another owner's model answers the same).",
    ),
    409: _doc(
        409,
        "model_not_ready",
        "job ftjob-0123456789abcdef01234567 is running; its model can be called once the job "
        "has succeeded",
        "The job has not succeeded yet.",
    ),
    503: _doc(
        503,
        "inference_unavailable",
        "no inference server is running: start one with `lorafleet inference`",
        "No inference server is running or reachable.",
    ),
}


def _payload(body: ChatCompletionRequest | CompletionRequest, settings: Settings) -> dict[str, Any]:
    """The body to forward: as sent, with ``max_tokens`` capped by the server's setting."""
    payload = body.model_dump(exclude_none=True)
    payload.pop("max_completion_tokens", None)
    payload["max_tokens"] = body.params(settings.inference_max_tokens).max_tokens
    return payload


@router.post("/chat/completions", responses=ERRORS)
async def chat_completions(
    body: ChatCompletionRequest, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    """Answer a conversation with a fine-tuned model (or a base model); `stream: true` streams.

    The prompt is rendered with the model's chat template exactly as training rendered it.
    """
    target, backends = await run_in_threadpool(
        inference.route_request, session, owner.owner, body.model, settings
    )
    payload = _payload(body, settings)
    return await forward("/v1/chat/completions", payload, target, backends, settings)


@router.post("/completions", responses=ERRORS)
async def completions(
    body: CompletionRequest, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    """Continue a raw prompt (tokenized as given); `stream: true` streams."""
    target, backends = await run_in_threadpool(
        inference.route_request, session, owner.owner, body.model, settings
    )
    payload = _payload(body, settings)
    return await forward("/v1/completions", payload, target, backends, settings)


@router.get("/models", response_model=ModelList)
def list_models(owner: CurrentOwner, session: SessionDep, settings: SettingsDep) -> ModelList:
    """Base models and your fine-tuned models: any `id` here is a valid `model`."""
    entries = inference.model_listing(session, owner.owner, settings)
    return ModelList(
        data=[ModelObject(id=e.id, created=e.created, owned_by=e.owned_by) for e in entries]
    )


@router.get("/models/{model:path}", response_model=ModelObject, responses={404: ERRORS[404]})
def retrieve_model(
    model: str, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> ModelObject:
    """One model: a base model, your fine-tuned model or one of its checkpoints."""
    entry = inference.describe_model(session, owner.owner, model, settings)
    return ModelObject(id=entry.id, created=entry.created, owned_by=entry.owned_by)
