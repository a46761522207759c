"""Headless Chromium for the gallery tests: Debian's chromium and chromium-driver, driven by Selenium.

`.ci/browser` installs them; where they are missing, the tests that use `chromium()` skip with the reason. The
flags are those that keep Chromium from reaching for the network, which this machine does not have.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")
# The Clipboard API needs a focused, permitted document, which a headless test cannot promise; the copy buttons
# are tested through a stand-in that records what the page asked to copy.
CLIPBOARD_STAND_IN = """
Object.defineProperty(navigator, "clipboard", {configurable: true, value: {
  writeText: (text) => { window.__copied = text; return Promise.resolve(); }}});
"""


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


def _missing(reason: str) -> None:
    """Skip, or fail where the browser is required (SDBATCH_REQUIRE_BROWSER=1: .ci/browser's stage)."""
    if os.environ.get("SDBATCH_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def missing_browser() -> str | None:
    """What is missing for the browser tests (selenium, Chromium, ChromeDriver), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[browser]'; bash .ci/browser does it)"
    if not _find("chromium", "chromium-browser", "/usr/bin/chromium") or not _find("chromedriver",
                                                                                  "/usr/bin/chromedriver"):
        return ("Chromium or ChromeDriver is not installed (Debian: apt-get install chromium chromium-driver; "
                "bash .ci/browser does it)")
    return None


def chromium(width: int = 1280, height: int = 2000, dark: bool = False):
    """A fresh headless Chromium (with the clipboard stand-in), or a skip naming what is missing."""
    reason = missing_browser()
    if reason:
        _missing(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _find("chromium", "chromium-browser", "/usr/bin/chromium")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CLIPBOARD_STAND_IN})
    if dark:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    return driver


def artifacts() -> Path:
    """Where screenshots go: $SDBATCH_ARTIFACTS, else artifacts/browser/ in the repository (git-ignored)."""
    path = Path(os.environ.get("SDBATCH_ARTIFACTS") or ROOT / "artifacts" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path
