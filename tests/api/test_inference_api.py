"""Inference through the API with the stock ``openai`` SDK: a live API, a real worker that trains
the adapter, and a live ``lorafleet inference`` server; answers checked against peft itself.

One deployment for the whole module (one training job, one or two inference servers): the tests
run in file order, the first before any inference server exists, the last kills one mid-stream.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.api.live import Live, chat_rows, live_stack, wait_for
from tests.e2e.live import job_body, upload, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-stack-" + __name__)]

MAX_TOKENS = 1000  # LORAFLEET_INFERENCE_MAX_TOKENS of this deployment (the context is 2048)
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is 50 + 98?"},
]


@dataclass
class Trained:
    job: dict[str, Any]
    model: str  # fine_tuned_model
    checkpoint: str  # a checkpoint's model name
    step: int
    spare_checkpoint: str  # another checkpoint, for the corruption test


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("live-inference")
    with live_stack(base, LORAFLEET_INFERENCE_MAX_TOKENS=str(MAX_TOKENS)) as stack:
        yield stack


@pytest.fixture(scope="module")
def trained(live: Live) -> Trained:
    with live.client() as http:
        file_id = upload(http, chat_rows(24))
        body = job_body(file_id, learning_rate=0.02, checkpoint_every_steps=2, max_steps=6)
        created = http.post("/jobs", json=body)
        assert created.status_code == 201, created.text
        job = wait_final(http, created.json()["id"])
        assert job["status"] == "succeeded", f"{job}\n{live.log_tails()}"
        checkpoints = http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    by_step = {c["step_number"]: c["fine_tuned_model_checkpoint"] for c in checkpoints}
    assert {2, 4} <= set(by_step), by_step  # the last step is the final adapter itself
    return Trained(job, job["fine_tuned_model"], by_step[4], 4, by_step[2])


@pytest.fixture(scope="module")
def server(live: Live, trained: Trained) -> tuple[Any, str]:
    return live.dep.start_inference()


def _sdk(live: Live, key: str | None = None, strict: bool = True) -> OpenAI:
    return OpenAI(
        base_url=f"{live.url}/v1",
        api_key=key or live.key,
        max_retries=0,
        timeout=120,
        _strict_response_validation=strict,
    )


@pytest.fixture(scope="module")
def sdk(live: Live) -> OpenAI:
    return _sdk(live)


@pytest.fixture(scope="module")
def bob(live: Live) -> OpenAI:
    return _sdk(live, live.dep.create_key("bob"))


# ------------------------------------------------------------------------------ peft reference
class Reference:
    """Greedy answers computed here with transformers + peft alone, from the downloaded adapter."""

    def __init__(self, live: Live, root: Path) -> None:
        self.live = live
        self.root = root
        self.base = live.dep.root / "model-src" / "tiny"
        self._folders: dict[str, Path] = {}

    def adapter(self, url: str, name: str) -> Path:
        if name not in self._folders:
            with self.live.client() as http:
                response = http.get(url)
                assert response.status_code == 200, response.text
            folder = self.root / name
            with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
                tar.extractall(folder, filter="data")
            self._folders[name] = folder / "adapter"
        return self._folders[name]

    def generate(self, adapter: Path | None, prompt_ids: list[int], n: int) -> tuple[str, int]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        ids = torch.tensor([prompt_ids])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n
        )
        tokens = [int(t) for t in out[0, len(prompt_ids) :]]
        stops = set(model.generation_config.eos_token_id)
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens if end is None else tokens[: end + 1]
        tokenizer = AutoTokenizer.from_pretrained(self.base)
        return tokenizer.decode(kept, skip_special_tokens=True), len(kept)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.base)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, prompt: str) -> list[int]:
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(self.base)(prompt)["input_ids"])


@pytest.fixture(scope="module")
def reference(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(live, tmp_path_factory.mktemp("reference"))


def _chat(sdk: OpenAI, model: str, stream: bool, **kwargs: Any) -> tuple[str, Any, str | None]:
    """(text, usage, finish_reason) of a chat completion, streamed or not."""
    params: dict[str, Any] = {"temperature": 0, "max_tokens": 24, **kwargs}
    if not stream:
        answer = sdk.chat.completions.create(model=model, messages=QUESTION, **params)  # type: ignore[arg-type]
        assert answer.object == "chat.completion" and answer.model == model
        return (
            answer.choices[0].message.content or "",
            answer.usage,
            answer.choices[0].finish_reason,
        )
    parts, usage, reasons = [], None, []
    chunks = sdk.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **params,
    )
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert all(r is None for r in reasons[:-1]) and reasons[-1] is not None
    return "".join(parts), usage, reasons[-1]


# ------------------------------------------------------------------------------ tests
def test_without_an_inference_server_the_api_says_so(sdk: OpenAI, trained: Trained) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model=trained.model, messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert "lorafleet inference" in caught.value.message


def test_models_lists_bases_and_own_fine_tuned_models(
    sdk: OpenAI, bob: OpenAI, trained: Trained
) -> None:
    mine = {m.id: m for m in sdk.models.list()}
    assert {"tiny", trained.model} <= set(mine)
    assert mine["tiny"].owned_by == "lorafleet" and mine[trained.model].owned_by == "t"
    assert all(m.object == "model" and m.created > 0 for m in mine.values())
    assert set(m.id for m in bob.models.list()) == {"tiny"}
    assert sdk.models.retrieve(trained.checkpoint).id == trained.checkpoint
    with pytest.raises(openai.NotFoundError) as caught:
        bob.models.retrieve(trained.model)
    assert caught.value.code == "model_not_found"


def test_greedy_answers_equal_peft_for_adapter_checkpoint_and_base(
    sdk: OpenAI, server: Any, trained: Trained, reference: Reference
) -> None:
    job_id = trained.job["id"]
    prompt = reference.chat_prompt(QUESTION)
    final = reference.adapter(f"/jobs/{job_id}/adapter", "final")
    checkpoint = reference.adapter(f"/jobs/{job_id}/checkpoints/{trained.step}/adapter", "ckpt")
    answers = {}
    for model, adapter in (
        (trained.model, final),
        (trained.checkpoint, checkpoint),
        ("tiny", None),
    ):
        text, count = reference.generate(adapter, prompt, 24)
        for stream in (False, True):
            got, usage, reason = _chat(sdk, model, stream)
            assert got == text, (model, stream)
            assert usage.completion_tokens == count and usage.prompt_tokens == len(prompt)
            assert usage.total_tokens == count + len(prompt)
            assert reason == ("length" if count == 24 else "stop")
        answers[model] = text
    assert answers[trained.model] != answers["tiny"], "the trained adapter changes the answer"


def test_completions_greedy_stream_and_not(
    sdk: OpenAI, live: Live, server: Any, trained: Trained, reference: Reference
) -> None:
    prompt = "The quick brown fox"
    final = reference.adapter(f"/jobs/{trained.job['id']}/adapter", "final")
    for model, adapter in (("tiny", None), (trained.model, final)):
        text, count = reference.generate(adapter, reference.text_prompt(prompt), 16)
        whole = sdk.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert whole.object == "text_completion" and whole.choices[0].text == text
        assert whole.usage is not None and whole.usage.completion_tokens == count
        # Streamed text_completion chunks carry finish_reason null until the last one, as
        # OpenAI and vLLM send them; the SDK's Completion type declares it non-null, so its
        # strict mode would refuse OpenAI's own stream: this one call parses leniently.
        loose = _sdk(live, strict=False)
        chunks = list(
            loose.completions.create(
                model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == text
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_tokens_is_capped_and_seeds_repeat(sdk: OpenAI, server: Any) -> None:
    capped = sdk.completions.create(model="tiny", prompt="Numbers:", max_tokens=5000, temperature=0)
    assert capped.usage is not None and capped.usage.completion_tokens <= MAX_TOKENS
    sampled = [
        sdk.completions.create(
            model="tiny", prompt="Numbers:", max_tokens=12, temperature=1.2, seed=seed
        )
        .choices[0]
        .text
        for seed in (3, 3, 4)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_tenancy_and_bad_requests(
    sdk: OpenAI, bob: OpenAI, live: Live, server: Any, trained: Trained
) -> None:
    for model in (trained.model, trained.checkpoint):
        with pytest.raises(openai.NotFoundError) as caught:
            bob.chat.completions.create(model=model, messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for change, param in bad:
        body = {"model": trained.model, "messages": QUESTION, **change}
        response = httpx.post(
            f"{live.url}/v1/chat/completions", json=body, headers=live.headers, timeout=30
        )
        assert response.status_code == 400, (change, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and param in error["message"], error
    # A job that did not succeed has no model yet; a deleted one has none any more.
    with live.client() as http:
        file_id = upload(http, chat_rows(8))
        job = http.post("/jobs", json=job_body(file_id, max_steps=500)).json()
        http.post(f"/jobs/{job['id']}/cancel")
        job = wait_final(http, job["id"])
        name = f"ft:tiny:t::{job['id']}"
        with pytest.raises(openai.ConflictError) as conflict:
            sdk.chat.completions.create(model=name, messages=QUESTION)  # type: ignore[arg-type]
        assert conflict.value.code == "model_not_ready" and "cancelled" in conflict.value.message
        assert http.delete(f"/jobs/{job['id']}").status_code == 200
        with pytest.raises(openai.NotFoundError) as gone:
            sdk.chat.completions.create(model=name, messages=QUESTION)  # type: ignore[arg-type]
        assert "deleted" in gone.value.message


def test_twenty_concurrent_streams_each_get_their_own_answer(
    sdk: OpenAI, live: Live, server: Any, trained: Trained
) -> None:
    models = ["tiny", trained.model, trained.checkpoint]
    prompts = [f"What is {i} + {i}?" for i in range(7)]
    cases = [(models[i % 3], prompts[i % 7]) for i in range(20)]
    alone = {}
    for model, question in set(cases):
        messages = [{"role": "user", "content": question}]
        answer = sdk.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=16,
        )
        alone[(model, question)] = answer.choices[0].message.content
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        model, question = cases[i]
        try:
            chunks = sdk.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=16,
                stream=True,
            )
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert {i: results[i] for i in range(20)} == {i: alone[cases[i]] for i in range(20)}
    assert len(set(alone.values())) > 1
    # The server reports what it holds; admins see it beside the workers.
    with live.dep.client(live.dep.create_key("ops", admin=True)) as http:
        held = wait_for(
            lambda: [
                s
                for s in http.get("/workers").json()["inference_servers"]
                if s["base_models"] == ["tiny"] and s["adapters"] >= 2
            ],
            timeout=30,
            what="the server's heartbeat",
        )
    assert held[0]["url"] == server[1] and held[0]["status"] in ("idle", "busy")
    health = httpx.get(server[1] + "/healthz", timeout=10).json()
    assert health["adapter_cache_count"] >= 2 and health["adapter_cache_bytes"] > 0  # on disk


def test_a_corrupt_adapter_is_refused_and_the_server_carries_on(
    sdk: OpenAI, live: Live, server: Any, trained: Trained
) -> None:
    storage = live.dep.root / "data" / "storage"
    weights = [
        p
        for p in storage.rglob("adapter_model.safetensors")
        if "step_2-" in str(p) and trained.job["id"] in str(p)
    ]
    assert len(weights) == 1, weights
    data = bytearray(weights[0].read_bytes())
    data[-1] ^= 0xFF
    weights[0].write_bytes(bytes(data))
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model=trained.spare_checkpoint, messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "adapter_corrupt" and "sha256" in caught.value.message
    text, _, _ = _chat(sdk, trained.model, stream=False)
    assert text


def test_cli_chat_streams_answers_and_words_its_errors(
    sdk: OpenAI, live: Live, server: Any, trained: Trained
) -> None:
    env = {**live.dep.env, "LORAFLEET_API_URL": live.url, "LORAFLEET_API_KEY": live.key}

    def chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", "chat", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    expected, _, _ = _chat(sdk, trained.model, stream=False)
    system, question = QUESTION[0]["content"], QUESTION[1]["content"]
    asked = chat(trained.job["id"], question, "--system", system, "--max-tokens", "24")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout == expected + "\n"
    # Without a prompt: a conversation on stdin, ended by an empty line.
    talk = chat(trained.model, "--system", system, "--max-tokens", "24", stdin=question + "\n\n")
    assert talk.returncode == 0, talk.stderr
    assert expected in talk.stdout
    for args, words in (
        (("ftjob-000000000000000000000000", "hi"), "no job"),
        (("no-such-model", "hi"), "does not exist"),
    ):
        failed = chat(*args)
        assert failed.returncode == 2, failed.stderr
        assert words in failed.stderr and "Traceback" not in failed.stderr


def test_a_server_killed_mid_stream_is_an_error_and_another_takes_over(
    sdk: OpenAI, live: Live, server: Any
) -> None:
    process, _ = server
    loose = _sdk(live, strict=False)  # text_completion chunks: see the completions test
    chunks = loose.completions.create(
        model="tiny", prompt="One two three", max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for i, _chunk in enumerate(chunks):
            if i == 0:
                os.killpg(process.pid, signal.SIGKILL)
    assert "stopped" in str(caught.value) or "early" in str(caught.value)
    live.dep.start_inference("inference-2")
    # The dead server is still registered (silent for less than 3 leases): the API skips it.
    answer = sdk.completions.create(model="tiny", prompt="One", max_tokens=4, temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
