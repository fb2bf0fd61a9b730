"""``lorafleet chat MODEL_OR_JOB_ID [PROMPT]``: talk to a fine-tuned model through the API.

A job id stands for its ``fine_tuned_model``. With a prompt, one answer is streamed to stdout;
without one, an interactive loop keeps the conversation (empty line, ``exit`` or Ctrl-D ends it).
Everything goes through ``POST /v1/chat/completions`` with ``stream: true``, so the CLI sees
what any OpenAI client sees. Failures are ``CliError`` lines, never tracebacks.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer

from cli.client import DEFAULT_URL, ApiKey, ApiUrl, example
from cli.http import EXIT_UNREACHABLE, Api, CliError, connect

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")


def model_name(api: Api, name: str) -> str:
    """``name`` as a model name: a job id becomes its job's ``fine_tuned_model``."""
    if not JOB_ID.match(name):
        return name
    job = api.get(f"/jobs/{name}")
    if not job.get("fine_tuned_model"):
        raise CliError(
            f"job {name} is {job['status']}; its model can be asked once the job has succeeded"
        )
    return str(job["fine_tuned_model"])


def stream_answer(api: Api, body: dict[str, Any]) -> Iterator[str]:
    """The answer's text as it arrives (server-sent chunks of ``/v1/chat/completions``)."""
    try:
        with api.http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=300
        ) as response:
            if response.status_code >= 400:
                response.read()
                api.check(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    message = chunk["error"].get("message") or "the answer was interrupted"
                    raise CliError(f"the answer broke off: {message}", EXIT_UNREACHABLE)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
    except httpx.TransportError as exc:
        raise api.unreachable(exc) from None
    raise CliError("the answer ended without [DONE] (the server stopped?)", EXIT_UNREACHABLE)


def _say(api: Api, body: dict[str, Any]) -> str:
    parts = []
    for text in stream_answer(api, body):
        parts.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def register(app: typer.Typer) -> None:
    @app.command(
        epilog=example(
            'lorafleet chat ftjob-... "What is the capital of France?"',
            "lorafleet chat ft:tiny-llama:alice::ftjob-...   # an interactive conversation",
        )
    )
    def chat(
        model: Annotated[
            str, typer.Argument(help="A job id, a fine_tuned_model, a checkpoint or base name.")
        ],
        prompt: Annotated[
            str | None, typer.Argument(help="Ask this and exit (default: interactive).")
        ] = None,
        system: Annotated[str | None, typer.Option(help="A system message first.")] = None,
        max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 256,
        temperature: Annotated[
            float, typer.Option(min=0, max=2, help="0 answers greedily (repeatably).")
        ] = 0.0,
        api_url: ApiUrl = DEFAULT_URL,
        api_key: ApiKey = None,
    ) -> None:
        """Ask a fine-tuned model (streams the answer)."""
        with connect(api_url, api_key) as api:
            name = model_name(api, model)
            messages: list[dict[str, str]] = []
            if system:
                messages.append({"role": "system", "content": system})
            settings = {"model": name, "max_tokens": max_tokens, "temperature": temperature}
            if prompt is not None:
                messages.append({"role": "user", "content": prompt})
                _say(api, {**settings, "messages": messages})
                return
            print(f"chatting with {name} (empty line or Ctrl-D ends)", file=sys.stderr)
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                if not line.strip() or line.strip() in ("exit", "quit"):
                    break
                messages.append({"role": "user", "content": line})
                answer = _say(api, {**settings, "messages": messages})
                messages.append({"role": "assistant", "content": answer})
