"""The reviewers' page at /review, driven in a real headless browser (Debian's chromium,
through Playwright) against a real server process: load the queue, open an item, read its
inputs and answer, label it."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerProcess, write_config
from fastserve.demo import example_rows
from models import tabular_body

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("FASTSERVE_REQUIRE_BROWSER_TESTS") == "1"
TOKEN = "page-token"
MODEL = "breast_cancer"

if CHROMIUM is None:
    if REQUIRED:
        raise RuntimeError("browser tests required, but chromium is missing")
    pytest.skip("needs chromium (apt-get install chromium)", allow_module_level=True)
if REQUIRED:
    from playwright.sync_api import Page, expect, sync_playwright
else:
    sync_api = pytest.importorskip("playwright.sync_api")
    Page, expect, sync_playwright = sync_api.Page, sync_api.expect, sync_api.sync_playwright

pytestmark = pytest.mark.timeout(180)


def call(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def queued(repo: Path) -> Iterator[ServerProcess]:
    """A server whose review queue holds the demo's least certain breast-cancer answers."""
    write_config(repo, MODEL, "review:\n  confidence_threshold: 0.9\n")
    proc = ServerProcess(
        repo, "--state-db", str(repo.parent / "s.db"), env={"FASTSERVE_ADMIN_TOKEN": TOKEN}
    )
    try:
        proc.wait_ready()
        for i, row in enumerate(example_rows(MODEL, 143)):
            call(proc.url, f"/v2/models/{MODEL}/infer", tabular_body(row, f"p{i}"))
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_a_reviewer_labels_an_item_on_the_page(queued: ServerProcess, page: Page) -> None:
    pending = call(queued.url, "/v2/review/items")["items"]
    assert pending, "no low-confidence answers to review"
    status = page.locator("#status")

    page.goto(f"http://{queued.url}/review")
    expect(page).to_have_title("fastserve review queue")
    page.click("#load")
    expect(status).to_have_text("enter the admin token first")
    page.fill("#token", "wrong")
    page.click("#load")
    expect(status).to_contain_text("the token is not valid")

    page.fill("#token", TOKEN)
    page.click("#load")
    expect(status).to_have_text(f"{len(pending)} item(s)")
    rows = page.locator("#items tbody tr")
    ids = [int(rows.nth(i).get_attribute("data-id") or 0) for i in range(rows.count())]
    assert ids == [item["id"] for item in pending]

    first = pending[0]
    rows.first.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-title")).to_contain_text(first["request_id"])
    expect(page.locator("#inputs")).to_contain_text("input float32 [1,30]")
    answer = page.locator("#primary")
    expect(answer).to_contain_text("label int64 [1]")
    expect(answer).to_contain_text("probabilities float32 [1,2]")

    page.fill("#label", "1")
    page.fill("#reviewer", "ann")
    page.click("#save")
    expect(status).to_have_text(f"item {first['id']} labelled [1] by ann")
    # the queue view refreshed: the labelled item left the pending list
    expect(rows).to_have_count(len(pending) - 1)

    item = call(queued.url, f"/v2/review/items/{first['id']}")
    assert (item["status"], item["label"], item["reviewer"]) == ("labelled", [1], "ann")

    # a label that is not a number is refused on the page, the item stays pending
    rows.first.click()
    expect(page.locator("#detail-title")).to_contain_text(pending[1]["request_id"])
    page.fill("#label", "not a number")
    page.click("#save")
    expect(status).to_contain_text("must be a number")
    assert call(queued.url, f"/v2/review/items/{pending[1]['id']}")["status"] == "pending"
