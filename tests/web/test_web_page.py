"""The web page in headless Chromium against a live server and worker training a real job.

Needs Debian's ``chromium`` + ``chromium-driver`` and PyPI's ``selenium``; skipped with the reason
when any is missing. Leaves a screenshot of the job page in ``docs/screenshot.png``.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.live import ROOT, Live, chat_rows, live_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-stack-" + __name__)]

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "docs" / "screenshot.png"


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_stack(tmp_path_factory.mktemp("live-web")) as stack:
        yield stack


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("headless Chromium missing: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1100")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def _submit_job(live: Live) -> str:
    with live.client() as http:
        train = http.post("/files", files={"file": ("train.jsonl", _jsonl(chat_rows(48)))})
        valid = http.post("/files", files={"file": ("valid.jsonl", _jsonl(chat_rows(8, seed=1)))})
        assert train.status_code == 201 and valid.status_code == 201, train.text + valid.text
        body = {
            "base_model": "tiny",
            "training_file": train.json()["id"],
            "validation_file": valid.json()["id"],
            "training": {
                "max_steps": 30,
                "batch_size": 2,
                "max_seq_length": 64,
                "packing": False,
                "eval_every_steps": 5,
                "checkpoint_every_steps": 10,
            },
        }
        response = http.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def test_jobs_table_job_page_chart_and_download(live: Live, browser: Any) -> None:
    job_id = _submit_job(live)
    browser.get(live.url + "/")
    key_input = wait_for(lambda: _visible(browser, "api-key"), timeout=20, what="the key form")
    key_input.send_keys(live.key)
    browser.find_element(By.ID, "save-key").click()

    row_css = f'tr[data-job-id="{job_id}"]'
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, row_css), 20, what="the job row")

    seen: set[str] = set()

    def progress_moved() -> bool:
        # The table is re-rendered every 2 s: an element found may go stale before it is read.
        try:
            cells = browser.find_elements(By.CSS_SELECTOR, f"{row_css} .progress-text")
            text = cells[0].text if cells else ""
        except StaleElementReferenceException:
            return False
        if re.fullmatch(r"\d+/\d+", text) and not text.startswith("0/"):
            seen.add(text)
        return len(seen) >= 2

    try:
        wait_for(progress_moved, timeout=240, interval=0.3, what="progress to move")
    except TimeoutError:
        pytest.fail(f"progress seen: {seen}\n{live.log_tails()}")

    # Navigate the way the row's link does (clicking it could hit a just-replaced row).
    href = wait_for(lambda: _attr(browser, f"{row_css} a", "href"), timeout=10, what="link")
    assert href.endswith(f"#/jobs/{job_id}")
    browser.execute_script("location.hash = arguments[0]", f"#/jobs/{job_id}")
    wait_for(lambda: _visible(browser, "job-view"), timeout=10, what="the job page")
    shown = browser.find_element(By.ID, "job-id")
    wait_for(lambda: shown.text == job_id, timeout=10, what="the job page's first refresh")

    # The page stops polling and marks itself settled after rendering a final state, so what
    # is read below is no longer being re-drawn.
    view = browser.find_element(By.ID, "job-view")
    settled = wait_for(
        lambda: view.get_attribute("data-settled"), timeout=300, what="the job to finish"
    )
    assert settled == "succeeded", live.log_tails()
    assert browser.find_element(By.ID, "job-status").text == "succeeded"

    chart = browser.find_element(By.ID, "loss-chart")
    train = chart.find_element(By.CSS_SELECTOR, "path.series-train")
    evals = chart.find_element(By.CSS_SELECTOR, "path.series-eval")
    points = int(train.get_attribute("data-points"))
    assert points >= 10, "one point per logged step of a 30-step job"
    assert train.get_attribute("d").count("L") == points - 1
    assert int(evals.get_attribute("data-points")) >= 2
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point-eval")) >= 2
    events = browser.find_elements(By.CSS_SELECTOR, "#events li")
    assert any("job succeeded" in e.text for e in events)
    assert browser.find_elements(By.CSS_SELECTOR, "#checkpoints li[data-step]")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    button = browser.find_element(By.ID, "download-adapter")
    assert button.is_enabled()
    button.click()
    target = browser.downloads / f"{job_id}-adapter.tar.gz"
    wait_for(target.exists, timeout=30, what="the adapter download")
    with tarfile.open(target) as tar:
        assert "adapter/adapter_model.safetensors" in tar.getnames()


def test_wrong_key_shows_the_key_form_again(live: Live, browser: Any) -> None:
    browser.get(live.url + "/")
    wait_for(lambda: _visible(browser, "api-key"), timeout=20, what="the key form")
    browser.find_element(By.ID, "api-key").send_keys("lf-not-a-key")
    browser.find_element(By.ID, "save-key").click()
    error = wait_for(
        lambda: browser.find_element(By.ID, "key-error").text, timeout=10, what="the refusal"
    )
    assert "refused" in error


def _visible(browser: Any, element_id: str) -> Any:
    found = browser.find_elements(By.ID, element_id)
    return found[0] if found and found[0].is_displayed() else None


def _attr(browser: Any, css: str, name: str) -> str | None:
    try:
        found = browser.find_elements(By.CSS_SELECTOR, css)
        return found[0].get_attribute(name) if found else None
    except StaleElementReferenceException:
        return None
