"""Headless Chromium for the dashboard's browser tests: a driver, the page's numbers,
and screenshots kept as test artifacts.

    driver = chromium_driver()
    driver.get(url)
    read_numbers(driver)            # {"requests": "1,234", "lag": "–", ...}
    save_screenshot(driver, "dashboard-unit.png")

Uses Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``), never
Selenium Manager: the test machines are offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
INSTALL_HINT = "run `make system-deps` (installs Debian's chromium and chromium-driver)"


def _chromium_binary() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def chromium_driver(width: int = 1400, height: int = 1800) -> WebDriver:
    """A headless Chromium WebDriver with a ``width`` x ``height`` window. The browser's
    console is kept (``driver.get_log("browser")``). Fails the test when Chromium or its
    driver is not installed."""
    binary = _chromium_binary()
    chromedriver = shutil.which("chromedriver")
    if binary is None or chromedriver is None:
        missing = " and ".join(
            name
            for name, path in (("chromium", binary), ("chromedriver", chromedriver))
            if path is None
        )
        pytest.fail(f"the browser tests need {missing}: {INSTALL_HINT}")
    options = Options()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_window_size(width, height)
    return driver


def read_numbers(driver: WebDriver) -> dict[str, str]:
    """The text of every element with a ``data-metric`` attribute, keyed by it."""
    return {
        el.get_attribute("data-metric"): el.text.strip()
        for el in driver.find_elements(By.CSS_SELECTOR, "[data-metric]")
    }


def artifacts_dir() -> Path:
    """``$RECLOOP_TEST_ARTIFACTS``, or ``tests/artifacts/`` in the repository (created)."""
    folder = Path(os.environ.get("RECLOOP_TEST_ARTIFACTS") or DEFAULT_ARTIFACTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(driver: WebDriver, name: str) -> Path:
    """Save the window as a PNG named ``name`` (``.png`` added when missing) under
    :func:`artifacts_dir`; return its path."""
    path = artifacts_dir() / (name if name.endswith(".png") else f"{name}.png")
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"the browser could not save a screenshot to {path}")
    return path
