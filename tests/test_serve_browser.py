"""The page end to end in a real browser: headless Chromium uploads a DICOM through the file input.

Needs Debian's chromium and chromium-driver (.ci/run installs them) and selenium (the dev extra).
"""
import io
import os

import numpy as np
import pytest
from PIL import Image

from pneumo_tf.inference import web
from pneumo_tf.models import card as model_card

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BOX_RED = (255, 32, 32)  # the stroke colour of style.css


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_in_a_browser_shows_decision_probability_and_boxes(trained_model, synthetic_rsna, browser, tmp_path,
                                                                running):
    flask_app = web.create_app(trained_model)
    client = flask_app.test_client()
    folder = synthetic_rsna["train_dir"]

    def api(name):
        with open(os.path.join(folder, name), "rb") as handle:
            return client.post("/api/predict", data={"file": (io.BytesIO(handle.read()), name)}).json

    # The file with the most boxes, so the drawing is exercised.
    name, expected = max(((name, api(name)) for name in sorted(os.listdir(folder))[:8]),
                         key=lambda item: (len(item[1]["boxes"]), item[0]))
    assert expected["boxes"], "no synthetic file gave a box"

    with running(flask_app) as base:
        browser.get(f"{base}/")
        assert browser.find_elements(By.ID, "result") == []
        browser.find_element(By.ID, "file").send_keys(os.path.join(folder, name))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 120).until(expected_conditions.presence_of_element_located((By.ID, "result")))

        assert browser.find_element(By.ID, "decision").text == expected["decision"]
        assert browser.find_element(By.ID, "probability").text == f"{expected['probability']:.3f}"
        assert browser.find_element(By.ID, "image-id").text == expected["id"]
        overlay = browser.find_element(By.ID, "overlay")
        assert overlay.size["width"] >= 300 and overlay.size["height"] >= 300
        boxes = browser.find_elements(By.CSS_SELECTOR, "#overlay g.box")
        assert len(boxes) == len(expected["boxes"])
        labels = [box.find_element(By.TAG_NAME, "text").text for box in boxes]
        assert labels == [f"{box['confidence']:.2f}" for box in expected["boxes"]]
        for box in boxes:
            drawn = box.find_element(By.TAG_NAME, "rect")
            assert drawn.size["width"] > 0 and drawn.size["height"] > 0
        assert len(browser.find_elements(By.CSS_SELECTOR, "#boxes tr.box-row")) == len(expected["boxes"])

        # The rendered page: a radiograph (grey levels, not a blank area) with red box outlines on it.
        screenshot = tmp_path / "serve_page.png"
        assert browser.save_screenshot(str(screenshot))
        with Image.open(screenshot) as picture:
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        location, size = overlay.location, overlay.size
        scale = pixels.shape[1] / browser.execute_script("return window.innerWidth")
        top, left = int(location["y"] * scale), int(location["x"] * scale)
        region = pixels[top: top + int(size["height"] * scale), left: left + int(size["width"] * scale)]
        grey = region[(region.max(axis=-1) - region.min(axis=-1)) < 8]
        assert grey.size and grey.std() > 20, "the radiograph did not render"
        red = (np.abs(region - BOX_RED).max(axis=-1) < 40).sum()
        assert red > 50, "no box outline rendered"

        # A file the server cannot read: the page says why, and keeps working.
        not_dicom = tmp_path / "notes.dcm"
        not_dicom.write_text("patientId,Target\n")
        browser.find_element(By.ID, "file").send_keys(str(not_dicom))
        browser.find_element(By.ID, "submit").click()
        error = WebDriverWait(browser, 120).until(expected_conditions.presence_of_element_located((By.ID, "error")))
        assert error.text.startswith("notes.dcm cannot be read as a radiograph: not a DICOM, PNG or JPEG file")
        assert browser.find_elements(By.ID, "result") == []


def test_the_page_warns_beside_the_result_of_a_model_trained_on_synthetic_data(trained_model, real_trained_model,
                                                                             shared_rsna, browser, running):
    """A real radiograph read by a model trained on synthetic pictures (the tiny model) and by one trained on
    converted real DICOMs (ten of them): the first page warns that the model is synthetic, the second does
    not, and says instead that ten real images are too few."""
    radiograph = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]
    warnings = {}
    for kind, model_dir in (("synthetic", trained_model), ("real", real_trained_model)):
        card = model_card.short(model_card.of_folder(model_dir))
        with running(web.create_app(model_dir)) as base:
            browser.get(f"{base}/")
            browser.find_element(By.ID, "file").send_keys(str(radiograph))
            browser.find_element(By.ID, "submit").click()
            WebDriverWait(browser, 120).until(expected_conditions.presence_of_element_located((By.ID, "result")))
            shown = browser.find_elements(By.CSS_SELECTOR, "#result .model-warning")
            assert all(element.is_displayed() for element in shown)
            warnings[kind] = [element.text for element in shown]
            assert browser.find_element(By.ID, "trained-on").text == card["trained_on"]
            assert browser.find_element(By.ID, "measured").text == card["measured"]
            assert browser.find_element(By.ID, "card-digest").text == card["card_sha256"][:16]
            assert browser.find_element(By.ID, "model-card").is_displayed()
    assert warnings["synthetic"] == ["Trained on 19 synthetic pictures, not radiographs: its readings of real chest "
                                     "X-rays mean nothing."]
    assert not any("synthetic" in warning for warning in warnings["real"])
    assert warnings["real"] == ["Trained on only 8 real radiographs (fewer than 3,000): too few for its readings to "
                                "be trusted."]
