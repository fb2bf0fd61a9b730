"""``/docs`` and ``/redoc`` in headless Chromium: served from installed assets (no CDN), the
Authorize button takes an API key, and "Try it out" on ``GET /jobs`` answers 200."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.live import Live, live_stack, wait_for
from tests.web.conftest import same_origin_only

pytestmark = pytest.mark.xdist_group("live-stack-" + __name__)

pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_stack(tmp_path_factory.mktemp("live-docs"), with_worker=False) as stack:
        yield stack


def _one(browser: Any, css: str) -> Any:
    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found and found[0].is_displayed() else None


def test_swagger_ui_authorize_and_try_it_out(live: Live, browser: Any) -> None:
    browser.get(live.url + "/docs")
    wait_for(lambda: _one(browser, ".swagger-ui .info .title"), timeout=30, what="Swagger UI")
    assert "lorafleet" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert same_origin_only(browser, live.url) == [], "nothing may come from a CDN"

    _one(browser, "button.btn.authorize").click()
    field = wait_for(lambda: _one(browser, ".modal-ux input"), timeout=10, what="the key field")
    assert "bearerAuth" in browser.find_element(By.CSS_SELECTOR, ".modal-ux").text
    field.send_keys(live.key)
    _one(browser, ".modal-ux button.modal-btn.auth.authorize").click()
    wait_for(lambda: _one(browser, ".modal-ux button.btn-done"), timeout=10, what="authorized")
    assert "Logout" in browser.find_element(By.CSS_SELECTOR, ".modal-ux").text
    _one(browser, ".modal-ux button.btn-done").click()

    operation = "#operations-jobs-list_jobs_jobs_get"
    _one(browser, f"{operation} .opblock-summary-control").click()
    wait_for(lambda: _one(browser, f"{operation} button.try-out__btn"), 10, what="Try it out")
    _one(browser, f"{operation} button.try-out__btn").click()
    wait_for(lambda: _one(browser, f"{operation} button.execute"), 10, what="Execute").click()
    status = wait_for(
        lambda: _one(
            browser, f"{operation} .live-responses-table tr.response .response-col_status"
        ),
        timeout=20,
        what="the live response",
    )
    assert status.text.strip().startswith("200"), status.text
    body = browser.find_element(By.CSS_SELECTOR, f"{operation} .live-responses-table").text
    assert '"data"' in body and '"has_more"' in body

    # The upload has a file picker, and errors are documented with their real body.
    browser.get(live.url + "/docs#/files/upload_file_files_post")
    upload = "#operations-files-upload_file_files_post"
    wait_for(lambda: _one(browser, upload), timeout=20, what="the upload operation")
    if not _one(browser, f"{upload} button.try-out__btn"):
        _one(browser, f"{upload} .opblock-summary-control").click()
    wait_for(lambda: _one(browser, f"{upload} button.try-out__btn"), 10, what="Try it out").click()
    assert wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, f"{upload} input[type=file]"),
        timeout=10,
        what="the file picker",
    )
    responses = browser.find_element(By.CSS_SELECTOR, f"{upload} .responses-table").text
    assert "422" in responses and "line 3" in responses and "401" in responses


def test_redoc_renders_offline(live: Live, browser: Any) -> None:
    import httpx

    policy = httpx.get(live.url + "/redoc").headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
    browser.get(live.url + "/redoc")
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "[data-section-id^='tag/jobs']"),
        timeout=40,
        what="ReDoc",
    )
    # ReDoc's footer tries its vendor's logo from a CDN; the page's policy blocks the request
    # and ReDoc drops the image on the error. Nothing else may even be attempted.
    foreign = same_origin_only(browser, live.url)
    assert set(foreign) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, foreign
    assert not browser.find_elements(By.CSS_SELECTOR, "img[alt='redocly logo']")
