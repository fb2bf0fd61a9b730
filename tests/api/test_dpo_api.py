"""DPO over HTTP (TestClient, SQLite and PostgreSQL): preference files, the job body's ``method``
on ``POST /jobs``, ``POST /estimate`` and ``/v1/fine_tuning/jobs``, and the refusals that name
the field."""

from __future__ import annotations

from typing import Any

from shared.db import session_factory
from shared.models import Checkpoint, Job
from shared.services import runs
from tests.api.test_jobs_api import _body, _file
from tests.conftest import jsonl

OPENAI_PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": f"Say {i}."}]},
        "preferred_output": [{"role": "assistant", "content": f"{i}"}],
        "non_preferred_output": [{"role": "assistant", "content": f"{i + 1}"}],
    }
    for i in range(4)
]
TRL_PAIRS = [{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i}"} for i in range(4)]


def _upload(client: Any, rows: list[dict[str, Any]], purpose: str = "fine-tune") -> str:
    response = client.post(
        "/files", files={"file": ("p.jsonl", jsonl(rows))}, data={"purpose": purpose}
    )
    assert response.status_code in (200, 201), response.text
    assert response.json()["format"] == "preference"
    return str(response.json()["id"])


def test_preference_files_and_dpo_jobs(client: Any) -> None:
    pairs = _upload(client, OPENAI_PAIRS)
    assert _upload(client, TRL_PAIRS) != pairs
    created = client.post("/jobs", json=_body(pairs, method={"type": "dpo"}))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["method"] == {"type": "dpo", "dpo": {"beta": 0.1, "precompute_reference": False}}
    assert client.get(f"/jobs/{job['id']}").json()["method"] == job["method"]
    auto = _body(pairs, method={"type": "dpo", "dpo": {"beta": "auto"}})
    assert client.post("/jobs", json=auto).json()["method"]["dpo"]["beta"] == 0.1
    tuned = _body(pairs, method={"type": "dpo", "dpo": {"beta": 0.5, "precompute_reference": True}})
    assert client.post("/jobs", json=tuned).json()["method"]["dpo"] == {
        "beta": 0.5,
        "precompute_reference": True,
    }
    supervised = client.post("/jobs", json=_body(_file(client))).json()
    assert supervised["method"] == {"type": "supervised", "dpo": None}


def test_method_and_file_must_agree(client: Any) -> None:
    pairs = _upload(client, TRL_PAIRS)
    text_file = _file(client)
    valid_pairs = _upload(client, OPENAI_PAIRS, purpose="validation")
    dpo = {"type": "dpo"}
    cases = [
        (_body(text_file, method=dpo), "training_file", "'dpo' trains on preference pairs"),
        (_body(pairs), "training_file", 'set method to {"type": "dpo"}'),
        (_body(pairs, method=dpo, validation_file=text_file), "validation_file", "holds text"),
        (_body(text_file, validation_file=valid_pairs), "validation_file", "preference pairs"),
        (_body(pairs, method={"type": "supervised", "dpo": {}}), "method", "method.dpo is set"),
        (_body(pairs, method={"type": "dpo", "dpo": {"beta": 0}}), "method.dpo.beta", "greater"),
        (_body(pairs, method={"type": "ppo"}), "method.type", "supervised"),
    ]
    for body, param, words in cases:
        response = client.post("/jobs", json=body)
        assert response.status_code in (400, 422), (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
        assert words in response.json()["detail"], response.text
    ok = client.post("/jobs", json=_body(pairs, method=dpo, validation_file=valid_pairs))
    assert ok.status_code == 201, ok.text


def test_estimate_knows_dpo_rows_hold_pairs(client: Any) -> None:
    pairs = _upload(client, TRL_PAIRS)
    body = _body(pairs, method={"type": "dpo"})
    body["training"]["max_seq_length"] = 64
    dpo = client.post("/estimate", json=body)
    assert dpo.status_code == 200, dpo.text
    sft = client.post("/estimate", json={**body, "training_file": None, "method": None})
    assert sft.status_code == 422  # method may be left out, not null
    sft_body = {k: v for k, v in body.items() if k not in ("method", "training_file")}
    sft = client.post("/estimate", json=sft_body).json()
    assert dpo.json()["method"] == "dpo" and sft["method"] == "supervised"
    assert dpo.json()["tokens_per_step"] == 2 * sft["tokens_per_step"]
    assert dpo.json()["dataset"]["rows"] == len(TRL_PAIRS)
    wrong = client.post("/estimate", json={**body, "method": {"type": "supervised"}})
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "training_file"


def test_openai_method_dpo(client: Any) -> None:
    pairs = _upload(client, OPENAI_PAIRS)
    body = {
        "model": "tiny",
        "training_file": pairs,
        "method": {
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "beta": 0.25,
                    "n_epochs": 2,
                    "batch_size": 2,
                    "learning_rate_multiplier": 0.5,
                    "precompute_reference": True,
                }
            },
        },
    }
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code in (200, 201), created.text
    job = created.json()
    assert job["method"]["type"] == "dpo" and job["method"]["supervised"] is None
    assert job["method"]["dpo"]["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 2,
        "learning_rate_multiplier": 0.5,
        "beta": 0.25,
    }
    native = client.get(f"/jobs/{job['id']}").json()
    assert native["method"]["dpo"] == {"beta": 0.25, "precompute_reference": True}
    assert native["training"]["epochs"] == 2 and native["training"]["learning_rate"] == 1e-4
    auto = {**body, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}}
    retrieved = client.post("/v1/fine_tuning/jobs", json=auto).json()
    assert retrieved["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    bare = client.post("/v1/fine_tuning/jobs", json={**body, "method": {"type": "dpo"}})
    assert bare.status_code in (200, 201), bare.text
    refusals = [
        ({**body, "method": {"type": "supervised"}}, "training_file"),
        ({**body, "method": {"type": "reinforcement"}}, "method.type"),
        (
            {**body, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}},
            "method.dpo.hyperparameters.beta",
        ),
        (
            {**body, "method": {"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}},
            "method.dpo.hyperparameters.gamma",
        ),
    ]
    for refused, param in refusals:
        response = client.post("/v1/fine_tuning/jobs", json=refused)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text


def _succeed(job_id: str, manifest: dict[str, Any] | None = None) -> None:
    """Mark a queued job succeeded the way a worker does (claim, then the fenced finish)."""
    with session_factory()() as session:
        claimed = runs.claim_job(session, job_id, "w1", 30)
        assert claimed is not None
        runs.finish_job(
            session,
            runs.Lease.of(claimed),
            "succeeded",
            adapter_key=f"jobs/{job_id}/adapter.tar.gz",
            adapter_sha256="0" * 64,
            adapter_bytes=1,
            manifest=manifest,
        )


def test_init_adapter_is_checked_at_submit(client: Any, bob_headers: dict[str, str]) -> None:
    """training.init_adapter names a succeeded job of the same owner (or a stored checkpoint of
    it) whose LoRA shape is this job's; anything else is refused naming the field."""
    text_file = _file(client)
    pairs = _upload(client, TRL_PAIRS)
    parent = client.post("/jobs", json=_body(text_file)).json()
    dpo = {"type": "dpo"}

    def submit(init: str, **extra: Any) -> Any:
        body = _body(pairs, method=dpo, **extra)
        body["training"]["init_adapter"] = init
        return client.post("/jobs", json=body)

    queued = submit(parent["id"])
    assert queued.status_code == 422 and "is queued" in queued.json()["detail"]
    assert queued.json()["error"]["param"] == "training.init_adapter"
    _succeed(parent["id"], manifest={"lora": parent["lora"]})
    ok = submit(parent["id"])
    assert ok.status_code == 201, ok.text
    assert ok.json()["training"]["init_adapter"] == parent["id"]
    name = client.get(f"/jobs/{parent['id']}").json()["fine_tuned_model"]
    assert submit(name).status_code == 201
    with session_factory()() as session:
        job = session.get(Job, parent["id"])
        assert job is not None
        session.add(Checkpoint(job_id=job.id, step=2, storage_key="k/", sha256="1" * 64))
        session.commit()
    assert submit(f"{name}:ckpt-step-2").status_code == 201
    other_lora = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    more_dropout = {**parent["lora"], "dropout": 0.2}  # dropout shapes training, not the adapter
    assert submit(parent["id"], lora=more_dropout).status_code == 201
    bob_file = client.post(
        "/files", files={"file": ("b.jsonl", jsonl(TRL_PAIRS))}, headers=bob_headers
    ).json()["id"]
    bob_body = _body(bob_file, method=dpo)
    bob_body["training"]["init_adapter"] = parent["id"]
    bobs = client.post("/jobs", json=bob_body, headers=bob_headers)
    assert bobs.status_code == 422 and bobs.json()["error"]["param"] == "training.init_adapter"
    cases = [
        (submit(parent["id"], lora=other_lora), "lora.r", "differs from the init adapter's 4"),
        (
            submit(parent["id"], lora={**parent["lora"], "target_modules": ["q_proj"]}),
            "lora.target_modules",
            "['q_proj', 'v_proj']",
        ),
        (submit(f"{name}:ckpt-step-9"), "training.init_adapter", "kept: 2"),
        (submit("ftjob-000000000000000000000000"), "training.init_adapter", "no job"),
        (submit("my-adapter"), "training.init_adapter", "is not a job id"),
    ]
    for response, param, words in cases:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param, response.text
        assert words in response.json()["detail"], response.text
