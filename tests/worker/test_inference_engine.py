"""The inference engine against independent references: peft's own ``generate``, training's own
tokenisation, and the same requests decoded one at a time.

The engine runs in-process here (one model load per test module); the HTTP path through the API
and a live ``lorafleet inference`` server is tested in tests/api/test_inference_api.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.datasets import Example, Message
from shared.inference_shapes import GenerationParams
from worker.inference.engine import (
    Engine,
    Request,
    Sink,
    Usage,
    run_until_done,
    stop_token_ids,
)
from worker.training.data import (
    IGNORE_INDEX,
    completion_prompt_ids,
    generation_prompt_ids,
    tokenize_examples,
)

# One engine (and one set of adapters) for the module, on one xdist worker.
pytestmark = pytest.mark.xdist_group(__name__)

MESSAGES = [
    Message("system", "You are terse.", False),
    Message("user", "What is the capital of France?", False),
]


class Collect(Sink):
    """Keeps what a request produced."""

    def __init__(self, streaming: bool = True) -> None:
        self.streaming = streaming
        self.parts: list[str] = []
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.error: str | None = None
        self.done = threading.Event()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def delta(self, text: str) -> None:
        self.parts.append(text)

    def finish(self, reason: str, usage: Usage) -> None:
        self.reason, self.usage = reason, usage
        self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()


def make_adapter(base: Path, out: Path, seed: int, targets: list[str]) -> Path:
    """A peft adapter with random (non-zero) LoRA weights, so it changes the base's answers."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj"], ["q_proj", "v_proj"], ["o_proj", "down_proj"], ["k_proj"]]
    return [make_adapter(tiny_model, root / f"a{i}", i, t) for i, t in enumerate(targets)]


@pytest.fixture(scope="module")
def engine() -> Any:
    engine = Engine(memory_bytes=1 << 30, max_batch=16, batch_wait_s=0.02).start()
    yield engine
    engine.stop()


def reference(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """peft's own greedy decoding, in fp32, on freshly loaded weights."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n
    )
    return [int(t) for t in out[0, len(prompt) :]]


def request(
    base: Path,
    prompt: list[int],
    adapter: Path | None = None,
    n: int = 12,
    streaming: bool = True,
    **params: Any,
) -> tuple[Request, Collect]:
    sink = Collect(streaming)
    settings = GenerationParams(max_tokens=n, temperature=params.pop("temperature", 0.0), top_p=1)
    settings = settings.model_copy(update=params)
    req = Request(
        base_model=base.name,
        base_path=str(base),
        prompt_ids=prompt,
        params=settings,
        sink=sink,
        adapter=adapter.name if adapter else None,
        adapter_path=adapter,
    )
    return req, sink


def expected_text(base: Path, tokens: list[int]) -> tuple[str, int]:
    """The text a client should see for reference tokens (stops at EOS), and the token count."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    stops = set(model.generation_config.eos_token_id)
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    kept = tokens if end is None else tokens[: end + 1]
    return tokenizer.decode(kept, skip_special_tokens=True), len(kept)


# ------------------------------------------------------------------------------ prompt rendering
def test_chat_prompt_is_the_template_with_generation_prompt(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in MESSAGES],
        add_generation_prompt=True,
        tokenize=False,
    )
    independent = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert generation_prompt_ids(tokenizer, MESSAGES) == independent


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_plain_model"])
def test_chat_prompt_is_what_training_feeds_before_the_answer(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Training's own tokenisation of the conversation with an answer starts with exactly the
    inference prompt, and the first trained target is the answer's first token (template and
    plain format alike; a multi-turn history included)."""
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    history = [
        Message("user", "Hello there.", False),
        Message("assistant", "Hi.", True),
        Message("user", "What is 2 + 2?", False),
    ]
    answered = Example("chat", messages=(*history, Message("assistant", "Four.", True)))
    tokens, _ = tokenize_examples(tokenizer, [answered], 512)
    ids, targets = tokens.input_ids.tolist(), tokens.targets.tolist()
    prompt = generation_prompt_ids(tokenizer, history)
    assert ids[: len(prompt)] == prompt
    # targets are shifted: the target at position len(prompt) - 1 is the answer's first token.
    first_answer = len(prompt) - 1
    assert targets[first_answer] != IGNORE_INDEX
    assert all(t == IGNORE_INDEX for t in targets[len(prompt) - 3 : first_answer])


def test_completion_prompt_is_tokenized_as_given(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "The quick brown fox"
    assert completion_prompt_ids(tokenizer, text) == tokenizer(text)["input_ids"]


# ------------------------------------------------------------------------------ decoding
def test_greedy_equals_peft_generate_with_and_without_adapter(
    engine: Engine, tiny_model: Path, adapters: list[Path]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = generation_prompt_ids(tokenizer, MESSAGES)
    answers = {}
    for adapter in (None, adapters[0]):
        text, count = expected_text(tiny_model, reference(tiny_model, adapter, prompt, 16))
        for streaming in (True, False):  # text per step, or decoded once at the end
            req, out = request(tiny_model, prompt, adapter, n=16, streaming=streaming)
            run_until_done(engine, [req])
            assert out.error is None
            assert (out.text, out.usage.completion_tokens if out.usage else None) == (text, count)
            assert out.usage is not None and out.usage.prompt_tokens == len(prompt)
            assert streaming or len(out.parts) <= 1
        answers[adapter] = text
    assert answers[None] != answers[adapters[0]]  # the adapter is really applied


def test_mixed_batch_equals_one_by_one(
    engine: Engine, tiny_model: Path, adapters: list[Path]
) -> None:
    """Four adapters and the bare base, prompts of different lengths, in one batch: each row
    gets the tokens it gets alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [
        completion_prompt_ids(tokenizer, text)
        for text in (
            "The quick brown fox",
            "What is the weather like today? It is",
            "Numbers: one two three",
            "The cat sat on the mat. The dog",
            "Hello",
        )
    ]
    owners: list[Path | None] = [*adapters, None]
    alone = []
    for prompt, adapter in zip(prompts, owners, strict=True):
        req, out = request(tiny_model, prompt, adapter, n=10)
        run_until_done(engine, [req])
        alone.append((out.text, out.reason))
    engine.max_rows_seen = 0
    batch = [request(tiny_model, p, a, n=10) for p, a in zip(prompts, owners, strict=True)]
    run_until_done(engine, [r for r, _ in batch])
    assert [(out.text, out.reason) for _, out in batch] == alone
    assert engine.max_rows_seen == 5  # they really shared forward passes
    assert len(set(alone)) > 1


def test_a_request_joining_a_running_batch_gets_its_own_answer(
    engine: Engine, tiny_model: Path, adapters: list[Path]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    long_prompt = completion_prompt_ids(tokenizer, "The sun rises in the east and sets in the")
    late_prompt = completion_prompt_ids(tokenizer, "Hello")
    late, late_out = request(tiny_model, late_prompt, adapters[1], n=6)
    run_until_done(engine, [late])
    solo = late_out.text
    first, first_out = request(tiny_model, long_prompt, adapters[2], n=40)
    second, second_out = request(tiny_model, late_prompt, adapters[1], n=6)
    engine.submit(first)
    # Join once the first request is decoding (its first text has arrived).
    for _ in range(2000):
        if first_out.parts or first_out.done.is_set():
            break
        threading.Event().wait(0.005)
    run_until_done(engine, [second])
    assert not first_out.done.is_set()  # the late request did not wait for the first to end
    assert first_out.done.wait(60)
    assert first_out.reason == "length"
    assert second_out.text == solo
    expected, _ = expected_text(tiny_model, reference(tiny_model, adapters[2], long_prompt, 40))
    assert first_out.text == expected


def test_stop_sequences_and_length(engine: Engine, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = completion_prompt_ids(tokenizer, "Numbers: one two three")
    req, full = request(tiny_model, prompt, n=20)
    run_until_done(engine, [req])
    assert full.reason in ("length", "stop") and len(full.text) > 4
    stop = full.text[2:4]
    req, cut = request(tiny_model, prompt, n=20, stop=[stop])
    run_until_done(engine, [req])
    assert cut.reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    req, short = request(tiny_model, prompt, n=3)
    run_until_done(engine, [req])
    assert short.usage is not None and short.usage.completion_tokens <= 3


def test_sampling_repeats_with_a_seed(engine: Engine, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = completion_prompt_ids(tokenizer, "The quick brown fox")
    runs = []
    for seed in (7, 7, 8):
        req, out = request(tiny_model, prompt, n=12, temperature=1.5, seed=seed, top_p=0.95)
        run_until_done(engine, [req])
        runs.append(out.text)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_base_models_and_adapters_are_evicted_least_recently_used(
    tiny_model: Path, tiny_plain_model: Path, adapters: list[Path]
) -> None:
    """A memory bound that fits one tiny model, two adapters per base: the least recently used
    go, come back on demand, and answer as before."""
    engine = Engine(memory_bytes=700_000, max_adapters=2, batch_wait_s=0).start()
    try:
        prompt = completion_prompt_ids(AutoTokenizer.from_pretrained(tiny_model), "Hello")
        first: dict[Path, str] = {}
        for adapter in [adapters[0], adapters[1], adapters[2], adapters[0]]:
            req, out = request(tiny_model, prompt, adapter, n=6)
            run_until_done(engine, [req])
            assert out.error is None
            assert out.text == first.setdefault(adapter, out.text)
        assert engine.held() == (["tiny"], 2)
        assert engine.in_use() == {adapters[2], adapters[0]}  # what the adapter cache keeps
        plain = completion_prompt_ids(AutoTokenizer.from_pretrained(tiny_plain_model), "Hello")
        req, out = request(tiny_plain_model, plain, n=4)
        run_until_done(engine, [req])
        assert out.error is None and engine.held() == (["tiny-plain"], 0)
        req, out = request(tiny_model, prompt, adapters[1], n=6)
        run_until_done(engine, [req])
        assert out.text == first[adapters[1]] and engine.held() == (["tiny"], 1)
        assert engine.in_use() == {adapters[1]}
    finally:
        engine.stop()


def test_mixed_batch_on_gpt2_equals_peft_generate(
    engine: Engine, gpt2_model: Path, tmp_path: Path
) -> None:
    """GPT-2 (Conv1D layers, tied embeddings; on CPU the engine re-lays its weights out): two
    adapters with other targets and the bare base in one batch, each row what peft's
    ``generate`` gives it alone."""
    first = make_adapter(gpt2_model, tmp_path / "g0", 10, ["c_attn"])
    second = make_adapter(gpt2_model, tmp_path / "g1", 11, ["c_proj", "c_fc"])
    tokenizer = AutoTokenizer.from_pretrained(gpt2_model)
    prompts = [
        completion_prompt_ids(tokenizer, text)
        for text in ("The quick brown fox", "Numbers: one two three", "Hello")
    ]
    owners: list[Path | None] = [first, second, None]
    stops = set(stop_token_ids(AutoModelForCausalLM.from_pretrained(gpt2_model), tokenizer))
    wanted = []
    for prompt, adapter in zip(prompts, owners, strict=True):
        tokens = reference(gpt2_model, adapter, prompt, 10)
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        wanted.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    engine.max_rows_seen = 0
    batch = [request(gpt2_model, p, a, n=10) for p, a in zip(prompts, owners, strict=True)]
    run_until_done(engine, [r for r, _ in batch])
    assert [out.error for _, out in batch] == [None] * 3
    assert [out.text for _, out in batch] == wanted
    assert engine.max_rows_seen == 3
    assert len(set(wanted)) == 3
