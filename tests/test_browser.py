"""A real browser (headless Chromium driven by selenium) uploads a photo and reads the answer off the page.

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them when missing); in CI it runs, it is
never skipped there. The screenshot it takes is the README's figures/app_identify.png (written there only with
VERICAR_PUBLISH_ARTIFACTS=1; see conftest.artifact_path).
"""

from __future__ import annotations

import io
import os
import shutil

import pytest

from conftest import artifact_path, load_script

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")


def _screenshot_script():
    return load_script("scripts/app_screenshot.py")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("CI needs chromium and chromedriver: .ci/run installs them with apt-get")
    driver = _screenshot_script().chrome()
    yield driver
    driver.quit()


def test_browser_uploads_a_photo_and_reads_the_answer(browser, tiny_open_world_run, synthcars_tiny, tmp_path):
    from selenium.webdriver.common.by import By

    from vericar.app import create_app, serving
    from vericar.identify import IdentifyService

    run = tiny_open_world_run
    service = IdentifyService.from_run(run.path, backend="torch")
    row = int(run.split.query[0])
    photo = tmp_path / "my car.jpg"
    synthcars_tiny.image(row).resize((256, 256)).save(photo, format="JPEG")
    expected = service.identify([service.decode(photo.read_bytes())])[0]
    with serving(create_app(service)) as url:
        card = _screenshot_script().upload_and_read(browser, url, photo)
        assert card.find_element(By.CSS_SELECTOR, ".class-name").text == expected["class_name"]
        assert card.find_element(By.CSS_SELECTOR, ".level-make").text == expected["levels"]["make"]["answer"]
        assert card.get_attribute("data-known") == str(expected["known"]).lower()
        assert len(card.find_elements(By.CSS_SELECTOR, ".nbrs img")) == 5
        assert "threshold" in card.text and "my car.jpg" in card.text
        png = browser.get_screenshot_as_png()
    from PIL import Image
    assert Image.open(io.BytesIO(png)).size[0] > 500
    artifact_path("figures/app_identify.png", tmp_path).write_bytes(png)
