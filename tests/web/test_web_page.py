"""The web page in headless Chromium against a live server and a real worker: a job created
through the page's form trains on the tiny model, finishes, answers a question in its "Try it"
box (streamed from a live inference server), and its adapter downloads; the fleet view for
admins; the key form.

With ``LORAFLEET_UPDATE_SCREENSHOTS=1`` it refreshes ``docs/screenshot.png`` (the job page) and
``docs/new-job.png`` (the form); otherwise the screenshots go to pytest's temporary folder, so a
test run never changes tracked files.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.live import ROOT, Live, chat_rows, live_stack, wait_for
from tests.web.conftest import same_origin_only, visible

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-stack-" + __name__)]

pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

_SHOTS = (
    ROOT / "docs"
    if os.environ.get("LORAFLEET_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="lorafleet-screens-"))
)
SCREENSHOT = _SHOTS / "screenshot.png"
FORM_SCREENSHOT = _SHOTS / "new-job.png"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_stack(tmp_path_factory.mktemp("live-web")) as stack:
        yield stack


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _log_in(browser: Any, live: Live, key: str | None = None) -> None:
    browser.get(live.url + "/")
    key_input = wait_for(lambda: visible(browser, "api-key"), timeout=20, what="the key form")
    key_input.send_keys(key or live.key)
    browser.find_element(By.ID, "save-key").click()
    wait_for(lambda: visible(browser, "jobs-view"), timeout=20, what="the jobs page")


def _set(browser: Any, field: str, value: str) -> None:
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def _worker_registered(live: Live) -> None:
    admin = live.dep.create_key("waiter", admin=True)
    with live.dep.client(admin) as http:
        wait_for(
            lambda: http.get("/workers").json()["data"], timeout=120, what="the worker to register"
        )


def test_create_job_in_the_page_watch_it_finish_download(
    live: Live, browser: Any, tmp_path: Path
) -> None:
    _worker_registered(live)  # the estimate judges the job against the registered fleet
    live.dep.start_inference(wait=False)  # for "Try it": it loads while the job trains
    train = _jsonl(tmp_path / "train.jsonl", chat_rows(48))
    valid = _jsonl(tmp_path / "valid.jsonl", chat_rows(8, seed=1))
    _log_in(browser, live)
    browser.find_element(By.ID, "new-job-button").click()
    wait_for(lambda: visible(browser, "new-view"), timeout=10, what="the new-job form")

    # Defaults and help text come from the API's own schema.
    rank = wait_for(lambda: browser.find_elements(By.ID, "lora.r"), 20, what="the LoRA fields")[0]
    assert rank.get_attribute("value") == "8"
    help_text = rank.find_element(By.XPATH, "following-sibling::p").text
    assert "Rank" in help_text and "default 8" in help_text

    browser.find_element(By.ID, "train-upload").send_keys(str(train))
    wait_for(
        lambda: browser.find_element(By.ID, "train-pick").get_attribute("value"),
        timeout=30,
        what="the uploaded training file to be picked",
    )
    browser.find_element(By.ID, "valid-upload").send_keys(str(valid))
    wait_for(
        lambda: browser.find_element(By.ID, "valid-pick").get_attribute("value"),
        timeout=30,
        what="the uploaded validation file to be picked",
    )
    Select(browser.find_element(By.ID, "base-model")).select_by_value("tiny")
    assert "chat template" in browser.find_element(By.ID, "model-info").text
    for field, value in {
        "training.max_steps": "30",
        "training.batch_size": "2",
        "training.max_seq_length": "64",
        "training.eval_every_steps": "5",
        "training.checkpoint_every_steps": "10",
        "suffix": "web",
    }.items():
        _set(browser, field, value)
    packing = browser.find_element(By.ID, "training.packing")
    if packing.is_selected():
        packing.click()

    # The estimate is shown before submitting, for the settings as typed.
    estimate = browser.find_element(By.ID, "estimate")
    wait_for(lambda: "30 steps" in estimate.text, timeout=20, what="the estimate")
    assert "per training process" in estimate.text and estimate.get_attribute("data-fits") == "true"
    _set(browser, "training.max_seq_length", "100000")
    wait_for(lambda: "max_position_embeddings" in estimate.text, timeout=20, what="the warning")
    _set(browser, "training.max_seq_length", "64")
    wait_for(lambda: "30 steps" in estimate.text, timeout=20, what="the estimate again")
    FORM_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(FORM_SCREENSHOT))

    browser.find_element(By.ID, "submit-job").click()
    match = wait_for(
        lambda: re.match(r".*#/jobs/(ftjob-[0-9a-f]+)$", browser.current_url),
        timeout=20,
        what="the job page after submitting",
    )
    job_id = match.group(1)
    wait_for(lambda: visible(browser, "job-view"), timeout=10, what="the job page")
    details = browser.find_element(By.ID, "job-details")
    wait_for(lambda: "r 8 · alpha 16" in details.text, timeout=10, what="the hyperparameters")
    assert "30 (max_steps)" in details.text and "64" in details.text

    # Progress arrives live (SSE progress frames and polling both update the line).
    steps: set[str] = set()

    def progress_moved() -> bool:
        try:
            step = browser.find_element(By.ID, "job-progress").get_attribute("data-step")
        except StaleElementReferenceException:
            return False
        if step and step != "0":
            steps.add(step)
        return len(steps) >= 2

    try:
        wait_for(progress_moved, timeout=240, interval=0.3, what="progress to move")
    except AssertionError:
        pytest.fail(f"progress seen: {steps}\n{live.log_tails()}")
    line = browser.find_element(By.ID, "job-progress").text
    assert "step" in line and "loss" in line

    view = browser.find_element(By.ID, "job-view")
    settled = wait_for(
        lambda: view.get_attribute("data-settled"), timeout=300, what="the job to finish"
    )
    assert settled == "succeeded", live.log_tails()
    assert browser.find_element(By.ID, "job-status").text == "succeeded"
    assert f"ft:tiny:t:web:{job_id}" in details.text

    chart = browser.find_element(By.ID, "loss-chart")
    assert chart.location["y"] < 700, "the chart is above the fold"
    train_line = chart.find_element(By.CSS_SELECTOR, "path.series-train")
    evals = chart.find_element(By.CSS_SELECTOR, "path.series-eval")
    points = int(train_line.get_attribute("data-points"))
    assert points >= 10, "one point per logged step of a 30-step job"
    assert train_line.get_attribute("d").count("L") == points - 1
    assert int(evals.get_attribute("data-points")) >= 2
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point-eval")) >= 2
    events = browser.find_elements(By.CSS_SELECTOR, "#events li")
    assert any("job succeeded" in e.text for e in events)
    ids = [int(e.get_attribute("data-event-id")) for e in events]
    assert ids == sorted(set(ids)), "live and polled events are shown once each, in order"
    assert browser.find_elements(By.CSS_SELECTOR, "#checkpoints li[data-step]")
    assert browser.find_element(By.ID, "job-failure").is_displayed() is False

    # "Try it": the fine-tuned model answers in the page, streamed; greedy, so it is exactly
    # what the API answers the same request.
    question = "What is 50 + 98?"
    body = {
        "model": f"ft:tiny:t:web:{job_id}",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 256,
    }
    with live.client() as http:
        answered = wait_for(
            lambda: (r := http.post("/v1/chat/completions", json=body)).status_code == 200 and r,
            timeout=180,
            what="the inference server",
        )
    expected = answered.json()["choices"][0]["message"]["content"]
    wait_for(lambda: visible(browser, "try-it"), timeout=20, what="the Try it box")
    browser.find_element(By.ID, "try-prompt").send_keys(question)
    browser.find_element(By.ID, "try-ask").click()
    box = browser.find_element(By.ID, "try-it")
    done = wait_for(lambda: box.get_attribute("data-done"), timeout=60, what="the answer")
    assert done == "ok", browser.find_element(By.ID, "try-error").text
    assert browser.find_element(By.ID, "try-answer").get_attribute("textContent") == expected

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    button = browser.find_element(By.ID, "download-adapter")
    assert button.is_enabled()
    button.click()
    target = browser.downloads / f"{job_id}-adapter.tar.gz"
    wait_for(target.exists, timeout=30, what="the adapter download")
    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert "adapter/adapter_model.safetensors" in names and "adapter/README.md" in names
    assert same_origin_only(browser, live.url) == []


def test_failed_job_shows_cause_logs_and_clone(live: Live, browser: Any) -> None:
    # fp16 needs a GPU: the CPU worker's engine refuses the job at once (a user error).
    with live.client() as http:
        file_id = http.post(
            "/files", files={"file": ("f.jsonl", json.dumps(chat_rows(4)[0]) + "\n")}
        ).json()["id"]
        body = {
            "base_model": "tiny",
            "training_file": file_id,
            "max_attempts": 1,
            "training": {"precision": "fp16", "max_steps": 2},
        }
        job = http.post("/jobs", json=body).json()
    _log_in(browser, live)
    browser.execute_script("location.hash = arguments[0]", f"#/jobs/{job['id']}")
    wait_for(lambda: visible(browser, "job-view"), timeout=10, what="the job page")
    view = browser.find_element(By.ID, "job-view")
    settled = wait_for(lambda: view.get_attribute("data-settled"), timeout=180, what="the end")
    assert settled == "failed", live.log_tails()
    failure = browser.find_element(By.ID, "job-failure")
    assert failure.is_displayed()
    assert "fp16" in browser.find_element(By.ID, "job-error").text, "the cause is shown"
    browser.find_element(By.ID, "show-logs").click()
    logs = browser.find_element(By.ID, "job-logs")
    wait_for(lambda: logs.text and logs.text != "loading…", timeout=20, what="the logs")
    # Either the attempt's log, or (a server without the logs route) a plain notice.
    assert "Could not load" not in logs.text, logs.text

    # A clone opens the form prefilled with the job's settings.
    browser.find_element(By.ID, "clone-job").click()
    wait_for(lambda: visible(browser, "new-view"), timeout=10, what="the prefilled form")
    wait_for(
        lambda: browser.find_element(By.ID, "train-pick").get_attribute("value") == file_id,
        timeout=20,
        what="the training file prefilled",
    )
    assert browser.find_element(By.ID, "training.max_steps").get_attribute("value") == "2"


def test_fleet_view_for_admins(live: Live, browser: Any) -> None:
    admin = live.dep.create_key("ops", admin=True)
    _log_in(browser, live, admin)
    browser.find_element(By.ID, "nav-fleet").click()
    rows = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr[data-worker-id]"),
        timeout=30,
        what="the workers table",
    )
    text = rows[0].text
    assert "CPU" in text and "GiB" in text, text


def test_fleet_view_says_it_needs_an_admin_key(live: Live, browser: Any) -> None:
    _log_in(browser, live)
    browser.execute_script("location.hash = '#/fleet'")
    error = wait_for(
        lambda: browser.find_element(By.ID, "fleet-error").text, timeout=20, what="the notice"
    )
    assert "admin key" in error


def test_wrong_key_shows_the_key_form_again(live: Live, browser: Any) -> None:
    browser.get(live.url + "/")
    wait_for(lambda: visible(browser, "api-key"), timeout=20, what="the key form")
    browser.find_element(By.ID, "api-key").send_keys("lf-not-a-key")
    browser.find_element(By.ID, "save-key").click()
    error = wait_for(
        lambda: browser.find_element(By.ID, "key-error").text, timeout=10, what="the refusal"
    )
    assert "refused" in error
