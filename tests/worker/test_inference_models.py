"""The inference engine on other architectures than the Llama-style tiny model: GPT-2 (Conv1D
projections, learned absolute positions, no chat template, no pad token) and Qwen2 (GQA, q/k/v
bias, tied head). A mixed batch of two adapters with different target modules and the bare base
gives every row exactly peft's own greedy tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

from tests.worker.conftest import write_tiny_qwen2
from tests.worker.test_inference_engine import make_adapter, reference, request
from worker.inference.engine import Engine, run_until_done
from worker.training.data import completion_prompt_ids

pytestmark = pytest.mark.xdist_group(__name__)

TARGETS = {
    "gpt2": (["c_attn"], ["c_proj"]),
    "qwen2": (["q_proj", "v_proj"], ["o_proj", "k_proj"]),
}


@pytest.fixture(scope="module")
def qwen2_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 weights with the tiny tokenizer (the same 512-token vocabulary)."""
    folder = write_tiny_qwen2(tmp_path_factory.mktemp("models") / "qwen2")
    for item in tiny_model.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, folder / item.name)
    return folder


def _expected(base: Path, tokens: list[int]) -> str:
    """What a client should see for peft's tokens: up to the first end-of-sequence token (the
    generation config's, else the tokenizer's), special tokens dropped."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = GenerationConfig.from_pretrained(base).eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not stops and tokenizer.eos_token_id is not None:
        stops = {tokenizer.eos_token_id}
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    kept = tokens if end is None else tokens[: end + 1]
    return str(tokenizer.decode(kept, skip_special_tokens=True))


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_mixed_batch_equals_peft_on_other_architectures(
    family: str, request_fixture: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: Path = request_fixture.getfixturevalue(f"{family}_model")
    adapters = [
        make_adapter(base, tmp_path / f"a{i}", seed=10 + i, targets=targets)
        for i, targets in enumerate(TARGETS[family])
    ]
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = ["The quick brown fox", "Numbers: one two three four", "Hello"]
    prompts = [completion_prompt_ids(tokenizer, t) for t in texts]
    owners: list[Path | None] = [*adapters, None]
    expected = [
        _expected(base, reference(base, owner, prompt, 8))
        for prompt, owner in zip(prompts, owners, strict=True)
    ]
    assert len(set(expected)) > 1, "the adapters change the answers"
    engine = Engine(memory_bytes=1 << 30, max_batch=8, batch_wait_s=0.05).start()
    try:
        batch = [request(base, p, a, n=8) for p, a in zip(prompts, owners, strict=True)]
        run_until_done(engine, [r for r, _ in batch])
        assert [out.error for _, out in batch] == [None] * 3
        assert [out.text for _, out in batch] == expected
        assert engine.max_rows_seen == 3  # one mixed batch
    finally:
        engine.stop()


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> pytest.FixtureRequest:
    return request
