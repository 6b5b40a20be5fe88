"""Debian's headless chromium + chromedriver for the page tests (install.sh installs them)."""

import os
import shutil

import pytest

CHROMIUM = os.environ.get("D2L_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("D2L_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")

needs_chromium = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                    reason="needs chromium + chromedriver (install.sh installs them: apt-get install "
                                           "chromium chromium-driver)")


def start_chromium(width: int = 1280, height: int = 900):
    """A headless Chromium driven through selenium, window ``width`` × ``height``; the caller quits it."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
