"""The page at `/`, driven in headless Chromium (Debian's `chromium` and `chromium-driver`, through Selenium
with the system chromedriver: no browser download, no network): upload an image, ask, read the streamed
answer; regenerate and clear; zero-shot labels; text-to-image search with thumbnails.

Without Chromium the tests skip locally (`apt-get install chromium chromium-driver` runs them) and fail in
CI (`CI` set), where `.ci/run` installs it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.chat import IMAGE_TOKEN

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)),
                None)  # fmt: skip
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        pytest.fail("CI needs Debian's chromium and chromium-driver for the browser tests", pytrace=False)
    pytest.skip(
        "no chromium / chromedriver: apt-get install chromium chromium-driver", allow_module_level=True
    )


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def _set(browser, element_id: str, value) -> None:
    browser.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input'));", element_id, str(value),
    )  # fmt: skip


def test_chat_with_an_uploaded_image_streams_the_models_answer(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    image_path = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image_path)
    pipe = server.models["llava"].pipeline
    turn = [{"from": "human", "value": f"{IMAGE_TOKEN}\nis it big?"}]
    want = pipe.generate([[Image.open(image_path).convert("RGB")]], [turn],
                         pipe.generation_config(max_new_tokens=12))[0]  # fmt: skip

    browser.get(server.url + "/")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#chat-model option"))
    assert browser.find_element(By.ID, "chat-model").get_attribute("value") == "llava"
    browser.find_element(By.ID, "chat-image").send_keys(str(image_path))
    _wait(browser, lambda b: b.find_element(By.ID, "chat-preview").is_displayed())
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 12)
    browser.find_element(By.ID, "chat-input").send_keys("is it big?")
    browser.find_element(By.ID, "chat-send").click()
    answer = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))[-1]
    assert "error" not in answer.get_attribute("class")
    assert answer.find_element(By.CLASS_NAME, "text").text == want.strip()
    assert (
        browser.find_element(By.CSS_SELECTOR, ".msg.user img").get_attribute("src").startswith("data:image/")
    )
    assert browser.find_element(By.ID, "status").text.startswith("done (")

    browser.find_element(By.ID, "regenerate").click()  # same settings, greedy: the same answer again
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 1
          and not b.find_elements(By.CSS_SELECTOR, ".msg.streaming"))  # fmt: skip
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text == want.strip()
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_zero_shot_labels_and_image_search(browser, server, served_dirs):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#zs-model option"))
    browser.find_element(By.CSS_SELECTOR, ".tab[data-tab=labels]").click()
    browser.find_element(By.ID, "zs-image").send_keys(str(served_dirs["images"] / "01.png"))
    _wait(browser, lambda b: b.find_element(By.ID, "zs-preview").is_displayed())
    browser.find_element(By.ID, "zs-run").click()
    rows = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#zs-results .bar"))
    scores = [float(r.find_element(By.CLASS_NAME, "score").text) for r in rows]
    assert len(rows) == 3 and scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 0.01

    browser.find_element(By.CSS_SELECTOR, ".tab[data-tab=search]").click()
    _set(browser, "search-k", 5)
    browser.find_element(By.ID, "search-query").send_keys("a red circle")
    browser.find_element(By.ID, "search-run").click()
    figures = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#search-results figure"))
    assert len(figures) == 5
    _wait(browser, lambda b: all(b.execute_script("return arguments[0].naturalWidth", img) == 32
                                 for img in b.find_elements(By.CSS_SELECTOR, "#search-results img")))  # fmt: skip
