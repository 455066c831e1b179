"""A real browser for a test: headless Chromium from the system's packages, driven
by Selenium through the system's chromedriver, and a daemon on its own event
loop thread (the browser's calls block; the daemon must keep answering).

Selenium is handed the driver's path, so Selenium Manager never runs and
nothing is downloaded. Without Chromium, chromedriver or Selenium the test is
skipped with the reason, or fails when ``OTPD_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tests.support.services import service_unreachable

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

T = TypeVar("T")
WINDOW = (1200, 900)


def require_browser() -> tuple[str, str]:
    """The paths of chromium and chromedriver, or skip-or-fail with the reason."""
    try:
        import selenium  # noqa: F401
    except ImportError as exc:
        service_unreachable("selenium is not installed (scripts/venv.sh test installs it)", exc)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver))
                               if p is None)
        service_unreachable(f"{missing} not installed (Debian: apt-get install chromium"
                            " chromium-driver)")
    return browser, driver


def start_browser(profile: Path, window: tuple[int, int] = WINDOW) -> WebDriver:
    """Headless Chromium with a fresh profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox",  # root in a container has no sandbox
                "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-default-apps", "--hide-scrollbars",
                f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    # An explicit driver path: Selenium skips Selenium Manager (no download, ever).
    service = Service(executable_path=driver)
    try:
        return webdriver.Chrome(service=service, options=options)
    except Exception as exc:
        service_unreachable("headless chromium did not start", exc)


def basic_auth(driver: WebDriver, user: str, password: str) -> None:
    """Send these credentials with every request of the browser (as it would
    after the user answered its login prompt)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                           {"headers": {"Authorization": f"Basic {token}"}})


class LoopThread:
    """An event loop on its own thread: coroutines are run there and waited for."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="daemon-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """``fn()`` on the loop's thread (the daemon's state is not thread-safe)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
