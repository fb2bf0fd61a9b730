"""Jobs through the real service: validation, idempotency, listing, cancel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from shared.services import jobs, runs
from shared.spec import JobSpec
from tests.conftest import write_header_model


def _spec(file_id: str, **extra: Any) -> JobSpec:
    return JobSpec.model_validate({"base_model": "tiny", "training_file": file_id, **extra})


def test_create_publishes_to_the_broker(
    session: Session, settings: Settings, make_file: Callable[..., Any]
) -> None:
    job, created = jobs.create_job(session, "alice", _spec(make_file().id))
    assert created and job.status == "queued" and job.id.startswith("ftjob-")
    assert job.max_attempts == settings.max_attempts and job.attempts == 0
    assert job.spec["lora"]["r"] == 8
    queued = list((settings.broker_dir / "queue").iterdir())
    assert len(queued) == 1 and job.id in queued[0].read_text()
    assert [e.message for e in jobs.list_events(session, "alice", job.id)] == ["job created"]


def test_references_are_checked(
    session: Session, settings: Settings, make_file: Callable[..., Any]
) -> None:
    mine = make_file().id
    theirs = make_file(owner="bob").id
    cases = [
        (_spec(theirs), "training_file"),
        (_spec("file-nope"), "training_file"),
        (_spec(mine, validation_file=theirs), "validation_file"),
        (_spec(mine, base_model="missing"), "base_model"),
        (_spec(mine, base_model="../etc"), "base_model"),
        (_spec(mine, base_model="/etc/passwd"), "base_model"),
        (_spec(mine, base_model="a/b/c"), "base_model"),
    ]
    for spec, param in cases:
        with pytest.raises(InvalidInput) as exc:
            jobs.create_job(session, "alice", spec)
        assert exc.value.param == param, spec
    # any org/name hub id by default; none when the allow-list is empty
    jobs.create_job(session, "alice", _spec(mine, base_model="org/model"))
    strict = settings.model_copy(update={"allowed_hub_models": "org/ok"})
    jobs.create_job(session, "alice", _spec(mine, base_model="org/ok"), settings=strict)
    with pytest.raises(InvalidInput):
        jobs.create_job(session, "alice", _spec(mine, base_model="org/model"), settings=strict)


def test_submit_uses_the_one_resolver(
    session: Session, settings: Settings, make_file: Callable[..., Any]
) -> None:
    """Regression: submit refused hub patterns and mirror folders the resolver accepts."""
    mine = make_file().id
    write_header_model(settings.models_path / "mirror-org" / "model-x")
    only_mine = settings.model_copy(update={"allowed_hub_models": "my-org/*"})
    job, _ = jobs.create_job(
        session, "alice", _spec(mine, base_model="my-org/anything"), settings=only_mine
    )
    assert job.base_model == "my-org/anything"
    # a mirror is local: allowed with an empty hub allow-list, and its shapes are read
    # (default target modules filled in from the model's own names)
    none = settings.model_copy(update={"allowed_hub_models": ""})
    job, _ = jobs.create_job(
        session, "alice", _spec(mine, base_model="mirror-org/model-x"), settings=none
    )
    assert job.spec["lora"]["target_modules"]
    for refused in ("other-org/m", "my-org/../tiny", "../tiny", "tiny/../../etc", "~/models"):
        with pytest.raises(InvalidInput) as exc:
            jobs.create_job(session, "alice", _spec(mine, base_model=refused), settings=only_mine)
        assert exc.value.param == "base_model", refused


def test_idempotency(session: Session, make_file: Callable[..., Any]) -> None:
    file_id = make_file().id
    first, created = jobs.create_job(session, "alice", _spec(file_id), "key-1")
    again, created_again = jobs.create_job(session, "alice", _spec(file_id), "key-1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict):
        jobs.create_job(session, "alice", _spec(file_id, priority=5), "key-1")
    assert len(jobs.list_jobs(session, "alice")[0]) == 1


def test_active_job_limit(
    session: Session, settings: Settings, make_file: Callable[..., Any]
) -> None:
    file_id = make_file().id
    small = settings.model_copy(update={"max_active_jobs_per_owner": 2})
    first, _ = jobs.create_job(session, "alice", _spec(file_id), settings=small)
    jobs.create_job(session, "alice", _spec(file_id), settings=small)
    with pytest.raises(QuotaExceeded):
        jobs.create_job(session, "alice", _spec(file_id), settings=small)
    jobs.cancel_job(session, "alice", first.id)
    jobs.create_job(session, "alice", _spec(file_id), settings=small)


def test_list_pagination_and_filter(session: Session, make_job: Callable[..., Any]) -> None:
    file_job = make_job()
    created = [file_job] + [make_job(training_file=file_job.training_file) for _ in range(4)]
    make_job(owner="bob")
    newest_first = [j.id for j in reversed(created)]
    seen: list[str] = []
    after = None
    while True:
        page, has_more = jobs.list_jobs(session, "alice", limit=2, after=after)
        seen += [j.id for j in page]
        if not has_more:
            break
        after = page[-1].id
    assert seen == newest_first
    jobs.cancel_job(session, "alice", created[1].id)
    cancelled, _ = jobs.list_jobs(session, "alice", status="cancelled")
    assert [j.id for j in cancelled] == [created[1].id]
    with pytest.raises(InvalidInput):
        jobs.list_jobs(session, "bob", after=created[0].id)


def test_owner_isolation(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    for call in (jobs.get_job, jobs.cancel_job, jobs.get_progress, jobs.list_events):
        with pytest.raises(NotFound):
            call(session, "bob", job.id)  # type: ignore[operator]


def test_cancel_queued_running_and_final(session: Session, make_job: Callable[..., Any]) -> None:
    queued = make_job()
    cancelled = jobs.cancel_job(session, "alice", queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert jobs.cancel_job(session, "alice", queued.id).status == "cancelled"  # idempotent
    assert runs.claim_job(session, queued.id, "w1", 30) is None

    running = make_job()
    assert runs.claim_job(session, running.id, "w1", 30) is not None
    requested = jobs.cancel_job(session, "alice", running.id)
    assert requested.status == "running" and requested.cancel_requested
    assert runs.cancel_requested(session, running.id)
    assert runs.finish_job(session, runs.Lease(running.id, "w1", 1), "cancelled")
    assert jobs.get_job(session, "alice", running.id).status == "cancelled"

    done = make_job()
    runs.claim_job(session, done.id, "w1", 30)
    runs.finish_job(
        session, runs.Lease(done.id, "w1", 1), "succeeded", adapter_key="k", adapter_sha256="s"
    )
    with pytest.raises(Conflict):
        jobs.cancel_job(session, "alice", done.id)


def test_missing_models_dir_folder_is_refused(
    session: Session, settings: Settings, make_file: Callable[..., Any], tmp_path: Path
) -> None:
    (settings.models_path / "tiny2").write_text("not a folder")
    with pytest.raises(InvalidInput):
        jobs.create_job(session, "alice", _spec(make_file().id, base_model="tiny2"))


def test_publish_through_redis(
    session: Session, make_file: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from shared.config import reset_settings
    from shared.queueing import DEFAULT_QUEUE, reset_publisher

    # db 14, not 15: other suites' live workers use 15 and must not lose their queue to us.
    client = redis.Redis.from_url("redis://127.0.0.1:6379/14")
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis not reachable")
    client.delete(DEFAULT_QUEUE)
    monkeypatch.setenv("LORAFLEET_BROKER_URL", "redis://127.0.0.1:6379/14")
    reset_settings()
    reset_publisher()
    try:
        job, _ = jobs.create_job(session, "alice", _spec(make_file().id))
        messages = client.lrange(DEFAULT_QUEUE, 0, -1)
        assert len(messages) == 1 and job.id.encode() in messages[0]
    finally:
        client.delete(DEFAULT_QUEUE)
        reset_publisher()
