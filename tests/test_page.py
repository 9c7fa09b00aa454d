"""The draw-a-digit page in a real browser: headless Chromium driven by Selenium."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from cnnmnist import serve

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


@pytest.fixture(scope="module")
def url(trained):
    model = serve.Model(trained.checkpoint, "cnnmnist", warn=print)
    running = serve.Server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{running.port}"
    running.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium at a phone's size (Debian's chromium and chromium-driver; .ci/run
    installs them). Missing, the test fails rather than skips."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in CHROMIUM if shutil.which(p)), None)
    driver = next((p for p in DRIVER if shutil.which(p)), None)
    if not binary or not driver:
        pytest.fail("Chromium and its driver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=390,844")  # a phone
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def _wait_ready(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return document.body.dataset.state") == "ready"
    )


def _post_image(base: str, png: bytes) -> dict:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/predict", png, {"Content-Type": "image/png"})
    return json.loads(connection.getresponse().read())


def test_drawing_on_the_page_shows_what_the_api_answers(browser, url, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    pad = browser.find_element(By.ID, "pad")
    size = pad.size["width"]
    assert size <= 390  # fits the phone-sized window

    # A "7" with the mouse: the top bar, then the diagonal down to the left.
    points = [(0.25, 0.2), (0.75, 0.2), (0.6, 0.45), (0.45, 0.8)]
    chain = ActionChains(browser, duration=20)
    chain.move_to_element_with_offset(
        pad, int((points[0][0] - 0.5) * size), int((points[0][1] - 0.5) * size)
    )
    chain.click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        for t in np.linspace(0, 1, 8)[1:]:
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            chain.move_to_element_with_offset(pad, int((x - 0.5) * size), int((y - 0.5) * size))
    chain.release().perform()
    _wait_ready(browser)

    shown = browser.find_element(By.ID, "digit").text
    browser.save_screenshot(str(tmp_path / "page-drawn.png"))
    # The same pixels, sent by this test to the API, get the answer the page shows.
    data_url = browser.execute_script("return document.getElementById('pad').toDataURL()")
    drawn = base64.b64decode(data_url.split(",", 1)[1])
    answer = _post_image(url, drawn)
    assert shown == str(answer["digit"])
    assert answer["digit"] == 7  # the model reads the stroke the pointer drew
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10
    top = browser.find_element(By.CSS_SELECTOR, "#bars .bar.top span").text
    assert top == shown
    # The 28x28 picture the model saw is drawn, and it is the digit (not blank).
    seen = browser.execute_script(
        "return Array.from(document.getElementById('seen').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data)"
    )
    assert np.array(seen).reshape(28, 28, 4)[..., 0].max() > 200

    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text in ("\u2013", "-")
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .bar") == []


def test_uploading_a_photo_on_the_page(browser, url, tmp_path, mnist):
    from selenium.webdriver.common.by import By

    # A test digit photographed: dark ink on light paper, larger than MNIST.
    photo = tmp_path / "photo.png"
    Image.fromarray(255 - mnist.test_images[0]).resize((200, 200), Image.BILINEAR).save(photo)
    browser.get(url + "/")
    _wait_ready_or_empty(browser)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    _wait_ready(browser)
    browser.save_screenshot(str(tmp_path / "page-upload.png"))
    answer = _post_image(url, photo.read_bytes())
    assert browser.find_element(By.ID, "digit").text == str(answer["digit"])
    assert answer["digit"] == int(mnist.test_labels[0])


def _wait_ready_or_empty(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return document.body.dataset.state") in ("empty", "ready")
    )
