"""The README's picture of the web app: serve a trained run, upload a photo in headless Chromium, read the answer
off the page and save a screenshot.

    python scripts/app_screenshot.py --run ~/.cache/vericar/full/models/official --out figures/app_identify.png

The photo is the run's first query image (a test-set car for the official protocol) unless ``--photo`` names one.
Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (dev extra). The browser test
(tests/test_browser.py) drives the page with the same functions, on the tests' tiny model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chrome(window: str = "1100,900"):
    """A headless Chromium driven by selenium; a clear error when the browser or its driver is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        raise SystemExit("headless Chromium is needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={window}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def upload_and_read(browser, url: str, photo: Path, timeout: float = 60):
    """Open the app's page, upload ``photo``, wait for its answer card and return it (a selenium element)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, timeout)
    wait.until(lambda d: "database images" in d.find_element(By.ID, "served").text)
    browser.find_element(By.ID, "photos").send_keys(str(photo))
    browser.find_element(By.ID, "identify-button").click()
    return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".answer")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run folder")
    parser.add_argument("--photo", type=Path, help="the photo to upload (default: the run's first query image)")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "app_identify.png")
    args = parser.parse_args(argv)
    from selenium.webdriver.common.by import By

    from vericar.app import create_app, serving
    from vericar.identify import IdentifyService, open_run, test_photo_rows

    service = IdentifyService.from_run(args.run, backend="torch")
    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo
        if photo is None:
            run, cars = open_run(args.run, None)
            photo = Path(tmp) / "a query car.jpg"
            # a test photo, not one of the database's
            service.cars.image(int(test_photo_rows(run, cars)[0])).save(photo, format="JPEG", quality=92)
        browser = chrome()
        try:
            with serving(create_app(service)) as url:
                card = upload_and_read(browser, url, photo)
                answer = card.find_element(By.CSS_SELECTOR, ".class-name").text
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_bytes(browser.get_screenshot_as_png())
        finally:
            browser.quit()
    print(f"{args.out}: the page answered {answer!r} for {photo.name} (run {args.run})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
