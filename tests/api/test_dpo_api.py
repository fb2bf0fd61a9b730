"""DPO over HTTP (TestClient, SQLite and PostgreSQL): preference files, the job body's ``method``
on ``POST /jobs``, ``POST /estimate`` and ``/v1/fine_tuning/jobs``, and the refusals that name
the field."""

from __future__ import annotations

from typing import Any

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
