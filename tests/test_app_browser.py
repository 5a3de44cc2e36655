"""`icd app` in a real headless browser (the system's Chromium): upload a photo in the depth tab, run one
in-context generation from the gallery, check the images shown, and write a screenshot of each tab to
docs/images/app_*.png. Runs with `make test-browser` (ICD_BROWSER_TEST=1), which installs Chromium."""

import base64
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(os.environ.get("ICD_BROWSER_TEST") != "1", reason="the browser test runs with `make test-browser`")

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "samples" / "coffee_cc0.png"
SCREENSHOTS = ROOT / "docs" / "images"
WAIT = 600  # seconds: the 2 CPU cores (and the disk) this runs on may be shared


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> list[str]:
    """The shipped zoo's model for each tab (what `icd app` shows by default); micro models for the tabs it lacks."""
    from incontext_diffusion import app

    shipped = {capability: folder.path for capability, folder in app.find_models([]).items()}
    missing = set(app.CAPABILITIES.values()) - set(shipped)
    if missing:
        from test_app import build_micro_models

        shipped = {**build_micro_models(tmp_path_factory.mktemp("browser_models")), **shipped}
    return [str(path) for path in shipped.values()]


@pytest.fixture(scope="module")
def app_url(model_dirs, tmp_path_factory):
    """`icd app` started as a user would, on a free port; stopped (SIGTERM) at the end."""
    from cli_helpers import free_port

    port = free_port()
    log = open(tmp_path_factory.mktemp("app_log") / "app.log", "w+")
    command = [sys.executable, "-m", "incontext_diffusion", "app", "--port", str(port)]
    for folder in model_dirs:
        command += ["--model-dir", folder]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail(f"icd app did not start within {WAIT} s:\n{log.read()}")
            time.sleep(1)
    yield url
    process.terminate()
    assert process.wait(timeout=60) == 0  # SIGTERM is a clean stop (the temporary folder is removed)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Chromium and its driver are missing: `make test-browser` installs them (apt: chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # the given driver: nothing is downloaded
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(lambda d: condition(d), message=f"waited {WAIT} s for {what}")


def click(driver, css: str, what: str, text: str | None = None) -> None:
    """Click the first element matching `css` (and showing `text`) once the page lets it be clicked (not under a loading veil)."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        elements = [e for e in d.find_elements(By.CSS_SELECTOR, css) if text is None or e.text == text]
        try:
            return bool(elements) and elements[0].click() is None
        except ElementClickInterceptedException:
            return False

    wait_for(driver, clicked, what)


def open_tab(driver, name: str) -> None:
    click(driver, "button[role=tab]", f"the {name} tab", text=name)


def shown_image(driver, elem_id: str) -> np.ndarray:
    """The pixels of the image an output component shows, read back through a canvas in the page."""
    from selenium.webdriver.common.by import By

    image = wait_for(driver, lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
                                             if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)), None),
                     f"an image in #{elem_id}")
    data_url = driver.execute_script(
        "const i = arguments[0], c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
        "c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png');", image)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGBA"))


def assert_not_blank(pixels: np.ndarray) -> None:
    rgb, alpha = pixels[..., :3], pixels[..., 3]
    assert alpha.min() == 255, "transparent pixels: the image is not drawn"
    assert not (rgb == 255).all() and not (rgb == 0).all(), "the image is blank"


def test_depth_tab_and_in_context_generation_in_the_browser(app_url, browser, model_dirs, tmp_path):
    from selenium.webdriver.common.by import By

    from incontext_diffusion import app
    from incontext_diffusion.core.images import load_map

    models = app.Models(app.find_models(model_dirs))  # the same models in this process: what the page must show
    browser.get(app_url)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # Depth and segmentation: upload a photo, predict, read the coloured depth and the overlay back.
    open_tab(browser, "Depth and segmentation")
    browser.find_element(By.CSS_SELECTOR, "#depth-photo input[type=file]").send_keys(str(PHOTO))
    shown_image(browser, "depth-photo")  # the upload is in place
    click(browser, "#depth-run", "the Predict button")
    depth_colored, overlay = shown_image(browser, "depth-colored"), shown_image(browser, "depth-overlay")
    expected = app.depth_and_segmentation(models, PHOTO, tmp_path / "expected")
    assert depth_colored.shape[:2] == (256, 384)  # the photo's size
    assert_not_blank(depth_colored)
    # The app process and this one may use other thread counts: float sums differ in the last bits.
    assert np.abs(depth_colored[..., :3].astype(int) - np.asarray(expected.depth_colored)).max() <= 1
    assert_not_blank(overlay)
    assert overlay[..., :3].std() > 10  # the photo shows through the class colours
    link = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#depth-png a[download='coffee_cc0_depth.png']"), "the 16-bit PNG's link")[0]
    with urllib.request.urlopen(link.get_attribute("href")) as response:
        downloaded = np.asarray(Image.open(io.BytesIO(response.read())))
    np.testing.assert_allclose(downloaded, load_map(expected.depth_png), rtol=1e-3, atol=1)  # millimetres, 16 bit
    browser.save_screenshot(str(SCREENSHOTS / "app_depth.png"))

    # In-context generation: one click on the gallery's first pair fills the inputs; generate.
    open_tab(browser, "In-context generation")
    click(browser, "#in-context-gallery tr.tr-body", "the gallery's first pair")
    for elem_id in ("in-context-source", "in-context-target", "in-context-query"):
        shown_image(browser, elem_id)
    click(browser, "#in-context-run", "the Generate button")
    generated = shown_image(browser, "in-context-output")
    first = app.write_gallery(models, tmp_path / "gallery")[0]
    guidance = float(models.setting("in_context", "model", "guidance_scale", 9.0))
    expected = app.in_context(models, first.source, first.target, first.query, first.text, steps=20, guidance=guidance, seed=0)
    assert_not_blank(generated)
    assert np.abs(generated[..., :3].astype(int) - np.asarray(expected)).max() <= 2  # the same model, inputs and seed
    browser.execute_script("window.scrollTo(0, 0)")  # the inputs and the output, the gallery below
    browser.save_screenshot(str(SCREENSHOTS / "app_in_context.png"))

    # Grounding and text-to-image: one request each, for their screenshots.
    open_tab(browser, "Grounding")
    browser.find_element(By.CSS_SELECTOR, "#grounding-photo input[type=file]").send_keys(str(PHOTO))
    shown_image(browser, "grounding-photo")
    browser.find_element(By.CSS_SELECTOR, "#grounding-text textarea").send_keys("the white cup")
    click(browser, "#grounding-run", "the Locate button")
    assert_not_blank(shown_image(browser, "grounding-trajectory"))
    browser.save_screenshot(str(SCREENSHOTS / "app_grounding.png"))

    open_tab(browser, "Text-to-image")
    click(browser, "#text-to-image-run", "the Generate button")
    assert_not_blank(shown_image(browser, "text-to-image-output"))
    browser.save_screenshot(str(SCREENSHOTS / "app_text_to_image.png"))
