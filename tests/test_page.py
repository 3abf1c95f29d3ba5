"""The page (GET /) in a real browser: Playwright driving Debian's chromium types a Japanese text, sends it, and every
model's column ends with the API's own answer (the text written, the label, each label word's probability as a bar).
Without a CJK font chromium draws Japanese as empty boxes, so CI installs fonts-noto-cjk and the test checks the
font is there. The screenshot goes to $MINICALM_SCREENSHOT when set (the README's bench/serve_page.png)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx2
import pytest

from test_serve import QUESTION, ServeConfig, config, question_adapter, running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]   # this machine's network is closed: no calls home
TEXT = "この商品は最高です。また買いたいと思います。"


def browser_or_skip():
    if CHROMIUM is None:
        if os.environ.get("MINICALM_CI"):
            pytest.fail("chromium is absent, and MINICALM_CI is set: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is absent (apt-get install chromium fonts-noto-cjk)")
    fonts = subprocess.run(["fc-list", ":lang=ja"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no Japanese font: chromium would draw the text as boxes (apt-get install fonts-noto-cjk)"
    return CHROMIUM


def test_the_page_compares_every_model_and_shows_the_api_s_answers(serving, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = browser_or_skip()
    with running(config(serving)) as (url, server), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(url)
        page.wait_for_selector("#models input")
        boxes = page.locator("#models input")
        assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == list(server.models)
        assert all(boxes.nth(i).is_checked() for i in range(boxes.count()))
        page.fill("#prompt", TEXT)
        page.click("#send")
        for name in server.models:
            page.wait_for_selector(f'[data-model="{name}"][data-state="done"]', timeout=60_000)
        assert not page.locator(".error").count()
        for name, served in server.models.items():
            want = httpx2.post(f"{url}/v1/answers", json={"model": name, "text": TEXT}, timeout=60).json()
            col = page.locator(f'[data-model="{name}"]')
            assert col.locator(".answer").text_content() == want["text"]
            assert col.locator(".label").text_content() == (want["answer"] if want["answer"] is not None else "invalid")
            bars = col.locator(".bar")
            shown = {bars.nth(i).get_attribute("data-label"): float(bars.nth(i).get_attribute("data-p"))
                     for i in range(bars.count())}
            assert shown.keys() == (want["probabilities"] or {}).keys()
            assert all(abs(shown[k] - v) < 1e-6 for k, v in (want["probabilities"] or {}).items())
            assert "tokens/s" in col.locator(".speed").text_content()
        assert page.locator(".bar").count() == 2 * 3   # the base and two label adapters; the free-form one has none
        shot = Path(os.environ.get("MINICALM_SCREENSHOT") or tmp_path / "page.png")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_multiple_choice_column_shows_the_chosen_choice_and_each_choice_s_bar(serving, tmp_path):
    """A model whose task answers with one of the question's choices, asked on the page (the question and its choices
    tab-separated): its column names the choice picked (or invalid) and draws each choice's probability."""
    from playwright.sync_api import sync_playwright

    executable = browser_or_skip()
    adapter = question_adapter(serving, tmp_path / "jcqa")
    text = "\t".join(QUESTION.values())
    cfg = ServeConfig(model=str(serving[0]), adapter=[f"jcqa={adapter}"], port=0, device="cpu")
    with running(cfg) as (url, server), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#models input")
        page.fill("#prompt", text)
        page.click("#send")
        col = page.locator('[data-model="jcqa"]')
        page.wait_for_selector('[data-model="jcqa"][data-state="done"]', timeout=60_000)
        want = httpx2.post(f"{url}/v1/answers", json={"model": "jcqa", "text": text}, timeout=60).json()
        choices = list(QUESTION.values())[1:]
        assert not col.locator(".error").count() and col.locator(".answer").text_content() == want["text"]
        assert col.locator(".task").text_content() == ("task: jcommonsenseqa (question, choice0, choice1, choice2, "
                                                       "choice3, choice4: tab-separated)")
        assert col.locator(".label").text_content() == ("invalid" if want["answer"] is None else
                                                        f"{want['answer']}. {choices[want['answer']]}")
        bars = col.locator(".bar")
        assert [bars.nth(i).get_attribute("data-label") for i in range(bars.count())] == \
               [f"{k}. {c}" for k, c in enumerate(choices)]
        assert all(abs(float(bars.nth(k).get_attribute("data-p")) - q) < 1e-6
                   for k, q in enumerate(want["probabilities"]))
        browser.close()
