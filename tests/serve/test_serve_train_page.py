"""The Train tab in headless Chromium (Debian's `chromium`, driven by Playwright), end to end on a tiny model:
start a run from the page, watch its loss curve grow, stop it, open the adapter and chat with it.

Screenshots go to `$SOFTPROMPT_SCREENSHOTS` when set (else the test's tmp folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from _serve_fixtures import running_server
from test_serve_browser import ARGS, CHROMIUM

from softprompt.serve.launch import build_server
from tiny_lm import make_workspace

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")
START_MS = 180_000  # `softprompt train` starting in a child process: imports torch and transformers


def points(page) -> int:
    return int(page.locator("#loss-chart").get_attribute("data-points"))


@pytest.mark.slow  # a real `softprompt train` process, a few dozen steps, and a browser
def test_train_page_starts_watches_stops_and_opens_the_adapter(tmp_path):
    root = make_workspace(tmp_path, 16)
    model = str(root / "model")
    app = build_server(model, train_root=str(tmp_path / "runs"), cuda_graphs=False, max_model_len=128)
    shots = Path(os.environ.get("SOFTPROMPT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    expect = sync_api.expect
    with running_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(url + "/")
            page.click("#tab-train")
            expect(page.locator("#train-model")).to_have_value(model)  # the served model, filled in
            expect(page.locator("#train-state")).to_have_text("idle")

            # A bad value is refused with the server's message, and nothing starts.
            page.fill("#train-data", str(root / "missing.jsonl"))
            page.click("#train-start")
            expect(page.locator("#train-error")).to_contain_text("no such file on the server")
            expect(page.locator("#train-state")).to_have_text("idle")

            page.fill("#train-data", str(root / "data.jsonl"))
            page.fill("#train-name", "webrun")
            page.fill("#train-steps", "5000")  # far more than it will run: Stop ends it
            page.fill("#train-batch", "2")
            page.fill("#train-virtual", "4")
            page.fill("#train-lr", "0.05")
            page.fill("#train-max-length", "64")
            page.click("#train-start")
            expect(page.locator("#train-state")).to_have_text(re.compile("starting|running"))
            expect(page.locator("#train-start")).to_be_disabled()

            # The curve grows while the run goes: at least two updates after its first point.
            page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points) >= 1", timeout=START_MS)
            first = points(page)
            page.wait_for_function(f"Number(document.querySelector('#loss-chart').dataset.points) > {first}")
            second = points(page)
            page.wait_for_function(f"Number(document.querySelector('#loss-chart').dataset.points) > {second}")
            assert points(page) > second > first >= 1
            expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+ / 5000 · loss [\d.]+ · \d+ tok/s · ETA"))
            assert page.locator("#loss-chart .train-loss").get_attribute("points").count(",") >= 3
            page.screenshot(path=str(shots / "train-running.png"), full_page=True)

            # A second start from elsewhere is refused while this one goes.
            r = httpx.post(url + "/v1/train", json={"data": str(root / "data.jsonl"), "name": "other"})
            assert r.status_code == 409

            page.click("#train-stop")
            expect(page.locator("#train-state")).to_have_text("stopped", timeout=START_MS)
            stopped_at = points(page)
            assert 3 <= stopped_at < 5000
            expect(page.locator("#train-open")).to_be_enabled()
            page.screenshot(path=str(shots / "train-stopped.png"), full_page=True)

            # Open: the adapter joins the playground beside the base; the chat answers with it.
            page.click("#train-open")
            expect(page.locator("#chat")).to_have_class(re.compile("active"))
            expect(page.locator("#model-select")).to_have_value("webrun")
            expect(page.locator("#model-info")).to_contain_text("prompt tuning, 4 virtual tokens")
            ticked = page.locator("#compare-models input:checked")
            assert sorted(b.get_attribute("value") for b in ticked.all()) == sorted([model, "webrun"])
            page.fill("#max-tokens", "6")
            page.fill("#chat-input", "apple")
            page.click("#send")
            reply = page.locator(".msg.assistant").last
            expect(reply).to_have_attribute("data-done", "true")
            assert "error" not in (reply.get_attribute("class") or ""), reply.text_content()
            api = httpx.post(url + "/v1/chat/completions", timeout=30, json={
                "model": "webrun", "messages": [{"role": "user", "content": "apple"}], "max_tokens": 6,
                "temperature": 0}).json()["choices"][0]["message"]["content"]
            assert reply.locator(".text").text_content() == api
            page.screenshot(path=str(shots / "train-opened-chat.png"), full_page=True)
        finally:
            browser.close()
