"""The draw-a-digit page in a real browser: headless Chromium driven by Selenium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from cnnmnist.server.listen import Options, open_server

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
SEVEN = [(0.25, 0.2), (0.75, 0.2), (0.6, 0.45), (0.45, 0.8)]  # the bar, then the diagonal
PHONE = (390, 844)
WIDE = (1280, 800)


@pytest.fixture(scope="module")
def url(trained):
    running, _ = open_server(
        trained.checkpoint, "127.0.0.1", 0, Options(name="cnnmnist", allow_hosts=("*",)), print
    )
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{running.port}"
    running.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chrome or Chromium at a phone's size: the system's, with its driver, when
    installed (Debian's chromium and chromium-driver; .ci/run installs them), else the ones
    Selenium Manager downloads (online). With neither, the tests fail with one line: they
    never skip."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in CHROMIUM if shutil.which(p)), None)
    driver = next((p for p in DRIVER if shutil.which(p)), None)
    options = webdriver.ChromeOptions()
    if binary and driver:
        options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=390,844")  # a phone
    try:
        chrome = webdriver.Chrome(
            options=options, service=Service(driver) if binary and driver else None
        )
    except WebDriverException as e:
        first = (e.msg or str(e)).strip().splitlines()[0]
        pytest.fail(
            f"a browser is needed for the page's tests and none could be started ({first}): "
            "install chromium and chromium-driver, or go online for Selenium Manager",
            pytrace=False,
        )
    _viewport(chrome, *PHONE)  # the window's size less any frame: the page's own
    yield chrome
    chrome.quit()


def _wait_ready(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return document.body.dataset.state") == "ready"
    )


def _wait_ready_or_empty(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return document.body.dataset.state") in ("empty", "ready")
    )


def _post(base: str, png: bytes, path: str = "/predict") -> dict:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, png, {"Content-Type": "image/png"})
    return json.loads(connection.getresponse().read())


def _post_image(base: str, png: bytes) -> dict:
    return _post(base, png)


def _open(browser, url):
    browser.get(url + "/")
    _wait_ready_or_empty(browser)
    # Count the requests in flight per endpoint, to check the page never has two at once.
    browser.execute_script(
        """
        window.inFlight = {}; window.mostInFlight = {};
        const real = window.fetch;
        window.fetch = async (path, init) => {
          const key = String(path).split('?')[0];
          inFlight[key] = (inFlight[key] || 0) + 1;
          mostInFlight[key] = Math.max(mostInFlight[key] || 0, inFlight[key]);
          try { return await real(path, init); } finally { inFlight[key] -= 1; }
        };
        """
    )


def _draw(browser, points, steps: int = 8):
    """A stroke with the mouse through `points` (fractions of the pad), then ready."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pad = browser.find_element(By.ID, "pad")
    browser.execute_script("arguments[0].scrollIntoView({block: 'nearest'})", pad)
    size = pad.size["width"]

    def offset(x, y):
        return int((x - 0.5) * size), int((y - 0.5) * size)

    chain = ActionChains(browser, duration=20)
    chain.move_to_element_with_offset(pad, *offset(*points[0]))
    chain.click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        for t in np.linspace(0, 1, steps)[1:]:
            chain.move_to_element_with_offset(pad, *offset(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t))
    chain.release().perform()
    _wait_ready(browser)


def _pad_png(browser) -> bytes:
    data_url = browser.execute_script("return document.getElementById('pad').toDataURL()")
    return base64.b64decode(data_url.split(",", 1)[1])


def _canvas(browser, element_id: str) -> np.ndarray:
    """A canvas's own pixels (height, width, RGBA), as the page drew them."""
    flat, width, height = browser.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data),"
        " c.width, c.height]",
        element_id,
    )
    return np.array(flat, dtype=np.uint8).reshape(height, width, 4)


def _rect(browser, selector: str) -> dict:
    return browser.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom,"
        " width: r.width, height: r.height}",
        selector,
    )


def _screenshot(browser) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))


def _crop(shot: np.ndarray, rect: dict, ratio: float) -> np.ndarray:
    top, bottom = round(rect["top"] * ratio), round(rect["bottom"] * ratio)
    left, right = round(rect["left"] * ratio), round(rect["right"] * ratio)
    return shot[top:bottom, left:right].astype(int)


def _viewport(browser, width: int, height: int) -> None:
    """Resize the window so that the page's viewport is width x height CSS pixels."""
    browser.set_window_size(width, height)
    inner = browser.execute_script("return [innerWidth, innerHeight]")
    if inner != [width, height]:
        browser.set_window_size(2 * width - inner[0], 2 * height - inner[1])
    assert browser.execute_script("return [innerWidth, innerHeight]") == [width, height]


def test_drawing_on_the_page_shows_what_the_api_answers(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, url)
    size = browser.find_element(By.ID, "pad").size["width"]
    assert size <= 390  # fits the phone-sized window

    _draw(browser, SEVEN)  # a "7" with the mouse
    shown = browser.find_element(By.ID, "digit").text
    browser.save_screenshot(str(tmp_path / "page-drawn.png"))
    # The same pixels, sent by this test to the API, get the answer the page shows.
    answer = _post_image(url, _pad_png(browser))
    assert shown == str(answer["digit"])
    assert answer["digit"] == 7  # the model reads the stroke the pointer drew
    confidence = browser.find_element(By.ID, "confidence").text
    assert confidence == f"{100 * answer['confidence']:.1f}%"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10
    top = browser.find_element(By.CSS_SELECTOR, "#bars .bar.top span").text
    assert top == shown
    # The 28x28 picture the model saw is drawn, and it is the digit (not blank).
    assert _canvas(browser, "seen")[..., 0].max() > 200
    # Never more than one request in flight per endpoint while the stroke was drawn.
    most = browser.execute_script("return window.mostInFlight")
    assert most == {"predict": 1, "explain": 1}
    # The live region holds only the answer, said once drawing paused; the bars are not in it.
    live = browser.find_elements(By.CSS_SELECTOR, "[aria-live], [role=status], [role=alert]")
    assert [e.get_attribute("id") for e in live] == ["spoken"]
    assert live[0].get_attribute("textContent") == f"{shown}, {confidence}"

    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text in ("\u2013", "-")
    assert browser.execute_script("return document.body.dataset.state") == "empty"
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .bar.top") == []
    widths = [e.rect["width"] for e in browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert widths == [0] * 10
    # The explanation goes too: placeholders for the feature maps, an empty evidence picture.
    assert browser.find_elements(By.CSS_SELECTOR, "#layers img[src]") == []
    assert _canvas(browser, "evidence").max() == 0


def test_the_bars_are_drawn_as_wide_as_the_probabilities(browser, url):
    """The fills' rendered widths follow the probabilities, and the screenshot shows them."""
    _open(browser, url)
    browser.execute_script("document.getElementById('bars').scrollIntoView({block: 'nearest'})")
    ratio = browser.execute_script("return devicePixelRatio")
    empty = _crop(_screenshot(browser), _rect(browser, "#bars"), ratio)

    _draw(browser, SEVEN)
    browser.execute_script("document.getElementById('bars').scrollIntoView({block: 'nearest'})")
    answer = _post_image(url, _pad_png(browser))
    p = np.array(answer["probabilities"])
    fills = browser.execute_script(
        "return Array.from(document.querySelectorAll('#bars .bar')).map(b => ["
        " b.querySelector('.fill').getBoundingClientRect().width,"
        " b.querySelector('.track').getBoundingClientRect().width,"
        " Number(b.querySelector('[role=meter]').getAttribute('aria-valuenow'))])"
    )
    width, track, now = (np.array(column) for column in zip(*fills, strict=True))
    assert width[p.argmax()] > width[p.argmin()]
    assert width[p.argmax()] > 0.5 * track[p.argmax()]
    np.testing.assert_allclose(width, p * track, atol=1.0)  # ordered as the probabilities
    np.testing.assert_allclose(now, 100 * p, atol=0.06)

    # By pixels: the bars' region changed, and the top bar's fill is painted in its colour.
    drawn = _crop(_screenshot(browser), _rect(browser, "#bars"), ratio)
    assert drawn.shape == empty.shape
    assert np.abs(drawn - empty).max() > 100
    fill = _crop(_screenshot(browser), _rect(browser, "#bars .bar.top .fill"), ratio)
    green = (fill[..., 1] > 140) & (fill[..., 0] < 80) & (fill[..., 2] < 80)
    assert green.mean() > 0.9


def test_drawing_after_an_upload_starts_from_a_clean_pad(browser, url, tmp_path, mnist):
    photo = tmp_path / "photo.png"
    Image.fromarray(255 - mnist.test_images[0]).resize((200, 200), Image.BILINEAR).save(photo)
    _open(browser, url)
    browser.find_element("id", "file").send_keys(str(photo))
    _wait_ready(browser)
    assert _canvas(browser, "pad")[..., 0].min() < 128  # the photo is shown on the pad

    _draw(browser, [(0.5, 0.25), (0.5, 0.75)])  # one short stroke, a "1"
    pad = _canvas(browser, "pad")[..., :3].astype(int)
    band = np.zeros(pad.shape[:2], bool)
    band[40:240, 110:170] = True  # where the stroke lies (pad pixels, 280x280)
    assert (pad[~band] == 255).all()  # nothing of the photo is left outside the stroke
    assert pad[band].min() < 50
    # What the page shows is the API's answer for these pixels (a clean pad and the stroke).
    answer = _post(url, _pad_png(browser), "/predict?pixels=1")
    assert browser.find_element("id", "digit").text == str(answer["digit"])
    np.testing.assert_array_equal(_canvas(browser, "seen")[..., 0], np.array(answer["pixels"]))


def test_a_single_tap_asks_for_a_digit(browser, url):
    from selenium.webdriver.common.action_chains import ActionChains

    _open(browser, url)
    ActionChains(browser).move_to_element(browser.find_element("id", "pad")).click().perform()
    _wait_ready(browser)
    assert _canvas(browser, "pad")[..., 0].min() < 50  # the tap left a dot
    answer = browser.find_element("id", "answer").text
    assert "draw a digit" in answer
    assert "%" not in answer
    assert browser.find_element("id", "digit").text in ("\u2013", "-")
    assert browser.execute_script("return window.timings.predict.length") == 0
    assert browser.find_element("id", "spoken").get_attribute("textContent") == "draw a digit"


def test_the_page_fits_a_laptop_screen_and_a_phone(browser, url, tmp_path):
    """At 1280x800 the pad, the answer, the bars and the explanation show without scrolling,
    and nothing moves when the answer comes; at 390x844 nothing overflows sideways."""
    reserved = ["#pad", ".seen-frame", "#bars", ".evidence-frame", ".layer:last-child", "#status"]
    try:
        _viewport(browser, *WIDE)
        _open(browser, url)
        before = [_rect(browser, s) for s in reserved]
        _draw(browser, SEVEN)
        browser.save_screenshot(str(tmp_path / "page-wide.png"))
        assert [_rect(browser, s) for s in reserved] == before  # nothing jumped
        assert browser.execute_script("return scrollY") == 0
        shown = [
            "#pad",
            "#digit",
            "#confidence",
            "#inside",
            *[f".bar:nth-child({k})" for k in range(1, 11)],
        ]
        for selector in shown:
            box = _rect(browser, selector)
            assert box["top"] >= 0 and box["bottom"] <= WIDE[1], selector
            assert box["left"] >= 0 and box["right"] <= WIDE[0], selector

        _viewport(browser, *PHONE)
        _open(browser, url)
        _draw(browser, SEVEN)
        browser.save_screenshot(str(tmp_path / "page-phone.png"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= PHONE[0]
        for selector in ["#pad", "#bars", "#inside", ".layer img"]:
            assert _rect(browser, selector)["right"] <= PHONE[0], selector
    finally:
        _viewport(browser, *PHONE)


def test_the_page_shows_inside_the_network(browser, url):
    """The feature maps and the evidence the page draws are /explain's for the same pixels."""
    _open(browser, url)
    _draw(browser, SEVEN)
    explained = _post(url, _pad_png(browser), "/explain")
    assert explained["digit"] == 7

    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#layers .layer')).map(f => ["
        " f.querySelector('img').naturalWidth, f.querySelector('img').naturalHeight,"
        " f.querySelector('img').getAttribute('src'), f.querySelector('figcaption').textContent])"
    )
    assert len(shown) == len(explained["layers"]) == 2
    for (width, height, src, caption), layer in zip(shown, explained["layers"], strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(layer["mosaic"].split(",", 1)[1])))
        assert (width, height) == png.size
        assert src == layer["mosaic"]
        h, w, c = layer["shape"]
        assert layer["name"] in caption and layer["what"] in caption
        assert f"{h}\u00d7{w}\u00d7{c}" in caption
    assert "red: evidence for 7" in browser.find_element("id", "legend").text

    # The evidence picture: the input in grey, red where the evidence is for 7, blue against.
    drawn = _canvas(browser, "evidence")[..., :3].astype(float)
    saliency = np.array(explained["saliency"])
    strength = saliency / np.abs(saliency).max()
    grey = 255 - 0.7 * np.array(explained["input"])[..., None]
    tint = np.where(strength[..., None] >= 0, [220, 30, 30], [30, 80, 230])
    alpha = np.minimum(1, np.abs(strength))[..., None] * 0.85
    np.testing.assert_allclose(drawn, grey + (tint - grey) * alpha, atol=1.5)
    red = (drawn[..., 0] > drawn[..., 1] + 60) & (drawn[..., 0] > drawn[..., 2] + 60)
    assert red.sum() >= 10  # not blank: the evidence for 7 is painted


def test_errors_are_in_words(browser, url, tmp_path):
    """A file the server cannot read: its message; a server that does not answer: words, not
    the browser's exception."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    _open(browser, url)
    browser.find_element("id", "file").send_keys(str(notes))
    _wait_ready(browser)
    said = _post(url, notes.read_bytes())["error"]
    assert browser.find_element("id", "status").text == said

    _open(browser, url)
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    _draw(browser, SEVEN)
    status = browser.find_element("id", "status").text
    assert "did not answer" in status
    assert "TypeError" not in status and "Failed to fetch" not in status


def test_the_favicon_is_linked_and_served(browser, url):
    _open(browser, url)
    link = browser.execute_script("return document.querySelector('link[rel=icon]').href")
    assert link == url + "/favicon.svg"
    statuses = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(['/favicon.ico', '/favicon.svg'].map(p => fetch(p).then(r => r.status)))"
        ".then(done)"
    )
    assert statuses == [200, 200]


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
