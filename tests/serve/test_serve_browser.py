"""The playground page in headless Chromium (Debian's `chromium`, driven by Playwright; nothing downloaded).

Screenshots go to `$SOFTPROMPT_SCREENSHOTS` when set (else the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from _serve_fixtures import running_server, tiny_peft, tiny_tokenizer

from softprompt.serve import Engine
from softprompt.serve.app import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and os.environ.get("CI") == "true":  # CI must run it (Makefile installs chromium)
    raise RuntimeError("Debian's chromium is missing; apt-get install chromium")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "page-key"
TIMEOUT_MS = 20_000


def api_answer(url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_playground_chats_and_compares_adapters(tmp_path):
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_peft("llama"), tokenizer, max_num_seqs=16, max_model_len=128)
    app = create_app(engine, tokenizer, model_name="tiny-llama", api_key=KEY)
    shots = Path(os.environ.get("SOFTPROMPT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with running_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            sync_api.expect(page.locator("#server-status")).to_contain_text("API key")  # 401 until the key is given
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            sync_api.expect(page.locator("#server-status")).to_have_text("6 models")
            page.fill("#max-tokens", "24")

            # Chat: two turns with a prefix-tuning adapter, each answer equal to the API's.
            page.select_option("#model-select", "prefix8")
            sync_api.expect(page.locator("#model-info")).to_contain_text("8 virtual tokens")
            history = []
            for question in ["What is the capital of France?", "考试有哪些技巧？"]:
                page.fill("#chat-input", question)
                page.click("#send")
                reply = page.locator(".msg.assistant").last
                sync_api.expect(reply).to_have_attribute("data-done", "true")
                history.append({"role": "user", "content": question})
                expected = api_answer(url, "prefix8", history, 24)
                assert reply.locator(".text").text_content() == expected
                history.append({"role": "assistant", "content": expected})
            page.screenshot(path=str(shots / "playground-chat.png"), full_page=True)

            # Side by side: one prompt to four models at once.
            page.click("#tab-compare")
            page.fill("#compare-prompt", "Tell me about prompt tuning.")
            chosen = ["tiny-llama", "pt4", "ptune6", "prefix3"]
            for box in page.locator("#compare-models input").all():
                box.set_checked(box.get_attribute("value") in chosen)
            page.click("#compare-send")
            columns = page.locator("#columns .column")
            sync_api.expect(columns).to_have_count(4)
            for model in chosen:
                column = page.locator(f'#columns .column[data-model="{model}"]')
                sync_api.expect(column).to_have_attribute("data-done", "true")
                expected = api_answer(url, model, [{"role": "user", "content": "Tell me about prompt tuning."}], 24)
                assert column.locator(".output").text_content() == expected
                assert "error" not in (column.get_attribute("class") or "")
            texts = {page.locator(f'#columns .column[data-model="{m}"] .output').text_content() for m in chosen}
            assert len(texts) == 4  # each adapter answers its own way
            page.screenshot(path=str(shots / "playground-compare.png"), full_page=True)

            # An error shows in the page, and the page keeps working.
            page.click("#tab-chat")
            page.fill("#max-tokens", "100000")
            page.fill("#chat-input", "too long")
            page.click("#send")
            sync_api.expect(page.locator(".msg.assistant.error")).to_contain_text("context")
            page.click("#clear")
            page.fill("#max-tokens", "8")
            page.fill("#chat-input", "again")
            page.click("#send")
            sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "true")
            last = page.locator(".msg.assistant").last
            assert "error" not in (last.get_attribute("class") or ""), last.text_content()
        finally:
            browser.close()
