"""The stock ``openai`` SDK against a live lorafleet: uvicorn + a real Celery worker + tiny model.

Nothing is faked: the SDK parses our responses with its own models and pages with its own cursor
logic, so a shape mistake fails here the way it would fail a user.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from shared.services.webhooks import verify
from tests.api.live import Live, chat_rows, live_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-stack-" + __name__)]

SECRET = "test-webhook-secret"
# Short rows and small batches: a tiny dataset becomes enough optimizer steps to see progress,
# metric events and checkpoints, while one epoch still trains in seconds on a CPU.
TRAINING = {"max_seq_length": 64, "batch_size": 2, "checkpoint_every_steps": 2, "packing": False}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


class _Receiver(BaseHTTPRequestHandler):
    """Collects webhook deliveries: (headers, raw body)."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("live-openai")
    with live_stack(
        base, LORAFLEET_WEBHOOK_SECRET=SECRET, LORAFLEET_WEBHOOK_ALLOW="127.0.0.1"
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def sdk(live: Live) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def training_file(sdk: OpenAI) -> str:
    upload = sdk.files.create(file=("train.jsonl", _jsonl(chat_rows(24))), purpose="fine-tune")
    assert upload.object == "file" and upload.status == "processed"
    return upload.id


@pytest.fixture(scope="module")
def finished_job(sdk: OpenAI, live: Live, training_file: str, receiver: tuple[str, Any]) -> Any:
    url, _ = receiver
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=training_file,
        hyperparameters={"n_epochs": 1},
        suffix="sdk",
        extra_body={"training": TRAINING, "lora": {"r": 4}, "webhook_url": url},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")

    def done() -> Any:
        current = sdk.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    try:
        final = wait_for(done, timeout=420, interval=1.0, what=f"job {job.id} to finish")
    except TimeoutError:
        pytest.fail(f"job did not finish\n{live.log_tails()}")
    assert final.status == "succeeded", f"{final.error}\n{live.log_tails()}"
    return final


def test_file_round_trip(sdk: OpenAI, training_file: str) -> None:
    got = sdk.files.retrieve(training_file)
    assert got.id == training_file and got.purpose == "fine-tune" and got.bytes > 0
    assert isinstance(got.created_at, int)
    listed = [f.id for f in sdk.files.list()]
    assert training_file in listed


def test_job_trains_to_succeeded(finished_job: Any, training_file: str) -> None:
    job = finished_job
    assert job.fine_tuned_model == f"ft:tiny:t:sdk:{job.id}"
    assert job.model == "tiny" and job.organization_id == "t"
    assert job.training_file == training_file and job.result_files == []
    assert job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method is not None and job.method.type == "supervised"
    assert job.trained_tokens and job.trained_tokens > 0
    assert isinstance(job.finished_at, int) and job.finished_at >= job.created_at
    assert job.error is None and job.user_provided_suffix == "sdk"  # type: ignore[attr-defined]
    assert job.lora["r"] == 4  # type: ignore[attr-defined]  # lorafleet's extra key


def test_events_auto_paginate_newest_first(sdk: OpenAI, finished_job: Any) -> None:
    page = sdk.fine_tuning.jobs.list_events(finished_job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    events = list(page)  # the SDK follows after=<last id> while has_more
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)) > 3 and all(isinstance(i, str) for i in ids)
    stamps = [e.created_at for e in events]
    assert stamps == sorted(stamps, reverse=True)
    messages = [e.message for e in events if e.type == "message"]
    assert messages[0] == "job succeeded" and messages[-1] == "job created"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics, "per-step metric events are part of the feed"
    data = metrics[0].data
    assert isinstance(data, dict)
    assert data["step"] == data["total_steps"] and data["train_loss"] is not None
    assert {e.level for e in events} <= {"info", "warn", "error"}


def test_checkpoints_listed_and_downloadable(sdk: OpenAI, live: Live, finished_job: Any) -> None:
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(finished_job.id)
    assert checkpoints.data, "checkpoint_every_steps=2 leaves checkpoints"
    steps = [c.step_number for c in checkpoints.data]
    assert steps == sorted(steps, reverse=True)
    newest = checkpoints.data[0]
    assert newest.fine_tuning_job_id == finished_job.id
    assert newest.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{newest.step_number}")
    with live.client() as http:
        response = http.get(f"/jobs/{finished_job.id}/checkpoints/{newest.step_number}/adapter")
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            names = set(tar.getnames())
            state = json.load(tar.extractfile("adapter/state.json"))  # type: ignore[arg-type]
        assert names == {
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/state.json",
        }
        assert state["step"] == newest.step_number
        missing = http.get(f"/jobs/{finished_job.id}/checkpoints/99999/adapter")
        assert missing.status_code == 404


def test_webhook_delivered_signed(finished_job: Any, receiver: tuple[str, Any]) -> None:
    _, handler = receiver
    wait_for(lambda: handler.received, timeout=30, what="the webhook")
    headers, body = handler.received[-1]
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["x-lorafleet-event"] == "job.succeeded"
    assert verify(body, SECRET, lowered["x-lorafleet-signature"])
    payload = json.loads(body)
    assert payload["id"] == finished_job.id and payload["status"] == "succeeded"


def test_list_pagination_and_cancel(sdk: OpenAI, training_file: str, finished_job: Any) -> None:
    # max_steps keeps a job that the worker picks up before the cancel lands busy long enough.
    created = [
        sdk.fine_tuning.jobs.create(
            model="tiny", training_file=training_file, extra_body={"training": {"max_steps": 500}}
        )
        for _ in range(3)
    ]
    newest_first = [j.id for j in reversed(created)]
    first = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == newest_first[:2] and first.has_more
    second = sdk.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == newest_first[2]
    everything = [j.id for j in sdk.fine_tuning.jobs.list(limit=1)]  # auto-paging, one per page
    assert everything[:3] == newest_first and finished_job.id in everything

    for job in created:
        assert sdk.fine_tuning.jobs.cancel(job.id).status in ("cancelled", "running")

    def all_cancelled() -> bool:
        return all(sdk.fine_tuning.jobs.retrieve(j.id).status == "cancelled" for j in created)

    wait_for(all_cancelled, timeout=120, interval=1.0, what="cancelled jobs")
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(finished_job.id)


def test_errors_map_to_sdk_exceptions(sdk: OpenAI, live: Live, training_file: str) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert not_found.value.body["code"] == "not_found"  # type: ignore[index]

    bad = b'{"prompt": "2+2=", "completion": "4"}\n{"oops": 1}\n'
    with pytest.raises(openai.BadRequestError) as bad_file:
        sdk.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 2" in bad_file.value.message

    with pytest.raises(openai.BadRequestError) as bad_ref:
        sdk.fine_tuning.jobs.create(model="tiny", training_file="file-000000000000000000000000")
    assert bad_ref.value.body["param"] == "training_file"  # type: ignore[index]

    with pytest.raises(openai.BadRequestError) as not_pairs:  # DPO needs a preference file
        sdk.fine_tuning.jobs.create(
            model="tiny", training_file=training_file, method={"type": "dpo", "dpo": {}}
        )
    assert not_pairs.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.create(model="../etc", training_file=training_file)

    stranger = OpenAI(base_url=f"{live.url}/v1", api_key="lf-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.fine_tuning.jobs.list()

    response = httpx.get(f"{live.url}/v1/no/such/route", headers=live.headers)
    assert response.status_code == 404 and set(response.json()["error"]) >= {"message", "type"}


def test_progress_visible_while_running(sdk: OpenAI, live: Live, training_file: str) -> None:
    """While a job runs, native progress and the OpenAI estimate move (shared with the web)."""
    job = sdk.fine_tuning.jobs.create(
        model="tiny", training_file=training_file, extra_body={"training": {"max_steps": 400}}
    )
    try:
        with live.client() as http:

            def stepped() -> int | None:
                step = http.get(f"/jobs/{job.id}/progress").json().get("step")
                return step if step and step >= 2 else None

            wait_for(stepped, timeout=180, interval=0.5, what="progress")
        running = sdk.fine_tuning.jobs.retrieve(job.id)
        assert running.status == "running"
        assert running.estimated_finish is None or running.estimated_finish >= int(time.time()) - 5
    finally:
        sdk.fine_tuning.jobs.cancel(job.id)
        wait_for(
            lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "cancelled",
            timeout=120,
            what="cancel",
        )


def test_files_delete_and_models_delete(sdk: OpenAI, live: Live, finished_job: Any) -> None:
    """The SDK's ``files.delete`` and ``models.delete`` (last: it deletes the finished adapter)."""
    spare = sdk.files.create(
        file=("spare.jsonl", _jsonl(chat_rows(3, seed=7))), purpose="fine-tune"
    )
    deleted = sdk.files.delete(spare.id)
    assert deleted.id == spare.id and deleted.deleted is True and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(spare.id)

    name = finished_job.fine_tuned_model
    gone = sdk.models.delete(name)
    assert gone.id == name and gone.deleted is True
    after = sdk.fine_tuning.jobs.retrieve(finished_job.id)
    assert after.status == "succeeded" and after.fine_tuned_model is None
    with live.client() as http:
        assert http.get(f"/jobs/{finished_job.id}/adapter").status_code == 409
    with pytest.raises(openai.NotFoundError):
        sdk.models.delete("tiny")  # base models are the operator's, not deletable
