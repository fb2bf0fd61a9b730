"""OpenAI's inference request bodies (``/v1/chat/completions``, ``/v1/completions``), checked once.

The API validates a body with these models (a bad field is a 400 naming it) before it authorises
the model name and proxies; the inference server parses the same models again, so both sides
agree on every default. Parameters lorafleet cannot honour are refused by name rather than
silently ignored: ``n`` above 1, log-probabilities, tools, penalties, ``echo``, ``best_of``.

Streaming protocol (both endpoints, ``stream: true``): server-sent events, one JSON chunk per
``data:`` line (``chat.completion.chunk`` / ``text_completion``), ``finish_reason`` null until the
last choice chunk, which also carries ``usage``; with ``stream_options.include_usage`` a final
chunk with no choices carries it again, as OpenAI sends it; then ``data: [DONE]``. An error after
the stream started arrives as ``data: {"error": {...}}`` (the ``openai`` SDK raises it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.datasets import Message

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationParams",
    "ModelList",
    "ModelObject",
    "StreamOptions",
    "TextPart",
]

MAX_STOP = 4  # OpenAI's limit on stop sequences

# Fields a client may send that change the answer in ways lorafleet does not implement: refused
# when set to anything but their neutral value, so nobody believes they took effect.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class TextPart(BaseModel):
    """A text part of a message's content (the only part type a language model reads)."""

    type: Literal["text"] = Field(description="Only `text` parts are supported.")
    text: str = Field(max_length=1_000_000, description="The text.")


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Who speaks."
    )
    content: str | list[TextPart] | None = Field(
        default=None, description="The text, or a list of text parts."
    )
    name: str | None = Field(default=None, max_length=256, description="Ignored; accepted.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_message(self) -> Message:
        """The training side's message type (``shared.datasets``): one renderer for both."""
        return Message(self.role, self.text(), train=False)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` and no choices."
    )


class _Request(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1,
        max_length=512,
        description="A job's `fine_tuned_model`, a checkpoint's `fine_tuned_model_checkpoint`, "
        "or a base model name.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens to generate (capped at LORAFLEET_INFERENCE_MAX_TOKENS).",
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="0 = greedy; default 1 (sampling, as OpenAI)."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(
        default=None, ge=-(2**63), lt=2**64, description="Makes sampling repeatable."
    )
    stop: str | list[str] | None = Field(
        default=None, description=f"Up to {MAX_STOP} strings that end the answer (not included)."
    )
    n: int | None = Field(default=None, description="Choices per request: only 1 is served.")
    stream: bool | None = Field(default=False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: str | None = Field(default=None, max_length=256, description="Ignored; accepted.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported: send one request per choice")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for name, value in (self.model_extra or {}).items():
            neutral = _UNSUPPORTED.get(name)
            if neutral is not None and value not in neutral:
                raise ValueError(f"{name} is not supported by lorafleet's inference server")
        return self

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def params(self, cap: int) -> GenerationParams:
        """What generation needs, with ``max_tokens`` capped at ``cap``."""
        wanted = self.requested_tokens()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationParams(
            max_tokens=min(wanted, cap) if wanted else cap,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stops,
        )

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "ft:tiny-llama:alice::ftjob-0123456789abcdef01234567",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 32,
                    "temperature": 0,
                    "stream": True,
                }
            ]
        },
    )

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=10_000, description="The conversation so far."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="OpenAI's newer name of max_tokens (wins over it)."
    )

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> tuple[Message, ...]:
        return tuple(m.to_message() for m in self.messages)


class CompletionRequest(_Request):
    """``POST /v1/completions`` (a raw prompt, tokenized as given)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "tiny-llama", "prompt": "The capital of France is", "max_tokens": 8}
            ]
        },
    )

    prompt: str | list[str] = Field(description="The prompt (a string, or a list of one string).")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request (a string or a list of one string)")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class GenerationParams(BaseModel):
    """One request's decoding settings as the inference engine takes them."""

    max_tokens: int = Field(ge=1, description="Most tokens to generate.")
    temperature: float = Field(ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class ModelObject(BaseModel):
    """A model ``/v1/chat/completions`` can be asked for (OpenAI's ``model`` object)."""

    id: str = Field(description="The name to pass as `model`.")
    object: Literal["model"] = Field(default="model", description="Always `model`.")
    created: int = Field(ge=0, description="Unix seconds: when it was trained (or installed).")
    owned_by: str = Field(description="The owner of a fine-tuned model; `lorafleet` for bases.")


class ModelList(BaseModel):
    """``GET /v1/models``: base models and the caller's fine-tuned models."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[ModelObject] = Field(description="The models.")
