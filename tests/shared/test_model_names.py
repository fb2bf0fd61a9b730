"""Fine-tuned model names: format and parse are inverses; other names are no fine-tuned names."""

from __future__ import annotations

import secrets

from hypothesis import given
from hypothesis import strategies as st

from shared.model_names import (
    ModelRef,
    checkpoint_model_name,
    fine_tuned_model_name,
    parse_model_name,
)

JOB = "ftjob-0123456789abcdef01234567"
bases = st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,20})?", fullmatch=True
)
suffixes = st.none() | st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
owners = st.text(min_size=1, max_size=40)  # free text: colons, spaces, unicode


@given(bases, owners, suffixes, st.integers(min_value=0, max_value=10**8))
def test_format_then_parse_finds_the_job(
    base: str, owner: str, suffix: str | None, step: int
) -> None:
    job = f"ftjob-{secrets.token_hex(12)}"
    name = fine_tuned_model_name(base, owner, suffix, job)
    assert name.startswith(f"ft:{base}:") and name.endswith(f":{job}")
    assert name.count(":") == 4, "owner labels cannot add separators"
    assert parse_model_name(name) == ModelRef(job_id=job, base_model=base)
    checkpoint = checkpoint_model_name(base, owner, suffix, job, step)
    assert parse_model_name(checkpoint) == ModelRef(job_id=job, base_model=base, step=step)


def test_openai_shape_and_legacy_names() -> None:
    assert fine_tuned_model_name("tiny", "alice", "bot", JOB) == f"ft:tiny:alice:bot:{JOB}"
    assert fine_tuned_model_name("tiny", "a b:c", None, JOB) == f"ft:tiny:a-b-c::{JOB}"
    assert parse_model_name(f"tiny:ft-{JOB}") == ModelRef(JOB, "tiny")
    assert parse_model_name(f"tiny:ft-{JOB}:ckpt-step-20") == ModelRef(JOB, "tiny", 20)


@given(st.text(max_size=80))
def test_base_model_names_and_junk_are_not_fine_tuned(name: str) -> None:
    ref = parse_model_name(name)
    assert ref is None or ref.job_id in name


def test_rejects() -> None:
    for name in ("tiny-llama", "org/model", "ft:tiny:alice:bot:ftjob-short", f"ft:tiny:{JOB}", ""):
        assert parse_model_name(name) is None, name
