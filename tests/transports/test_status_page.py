"""The REST status page (/status) in a real browser: headless Chromium driven by
Selenium, against a running daemon with a simulated modem.

One daemon and one browser for the module. The daemon runs on its own event
loop thread, so the browser's blocking calls never stall it and the tests can
ask it (``status()``, the store) what the page should say.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import requests

from otpd.auth.htpasswd import set_user
from otpd.channels.sms.simulator import ModemSimulator
from otpd.transports import csrf
from otpd.transports.status_page import Viewer, render_page, signal_bars
from tests.support.browser import LoopThread, basic_auth, require_browser, start_browser
from tests.support.daemon import (
    API_PASSWORD,
    API_USER,
    SMS_QUICK,
    Running,
    free_port,
    modem_table,
    modems_ready,
    start_daemon,
    write_config,
)
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

VIEWER = "viewer"  # may view, may not block or unblock
PLAIN = "plain"  # the default grants: no status-page
PASSWORD = "pw-for-page-tests"
SIM_CAP = 50
GRANTS = f"""
[server.grants]
{API_USER} = ["status-page"]
{VIEWER} = ["status-page", "-block-msisdn", "-unblock-msisdn"]
"""
SENT = 3
_TOKEN = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Served:
    loop: LoopThread
    run: Running
    sim: ModemSimulator
    base: str

    def status(self) -> dict[str, Any]:
        return self.loop.call(self.run.daemon.status)

    def is_blocked(self, receiver: str) -> bool:
        store = self.run.daemon.store
        assert store is not None
        return self.loop.run(store.is_blocked(receiver))


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


APP = _auth(API_USER, API_PASSWORD)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_browser()  # skip (or fail in CI) before starting anything
    tmp = tmp_path_factory.mktemp("status-page")
    loop = LoopThread()
    sim = ModemSimulator(tmp / "modem1", name="sim1", seed=1)
    config = write_config(tmp, modem_table("sim1", tmp / "modem1") + SMS_QUICK + GRANTS,
                          wait=10, limits=f"enabled = true\nsim_daily_max = {SIM_CAP}")
    for user in (VIEWER, PLAIN):
        set_user(tmp / "users", user, PASSWORD, cost=4)

    async def start() -> tuple[Running, aiohttp.ClientSession]:
        await sim.start()
        session = aiohttp.ClientSession()
        run = await start_daemon(config, session)
        await modems_ready(run)
        for i in range(SENT):
            _, body = await run.client.call("send-sms", {
                "receiver": f"+6281255500{i:02d}", "message": f"hello {i}", "id": 900 + i})
            assert body["response_code"] == "0000", body

        async def delivered() -> bool:
            assert run.daemon.store is not None
            return (await run.daemon.store.counts()).get("sms_delivered", 0) >= SENT

        await wait_until(delivered, 10, "delivery reports")
        return run, session

    run, session = loop.run(start())
    assert run.daemon.rest is not None
    try:
        yield Served(loop, run, sim, f"http://127.0.0.1:{run.daemon.rest.port}")
    finally:
        async def stop() -> None:
            await run.daemon.stop()
            await session.close()
            await sim.stop()

        loop.run(stop())
        loop.close()


@pytest.fixture(scope="module")
def browser(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    driver = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    basic_auth(driver, API_USER, API_PASSWORD)
    try:
        yield driver
    finally:
        driver.quit()


def _token(served: Served, headers: dict[str, str]) -> str:
    page = requests.get(served.base + "/status?refresh=off", headers=headers, timeout=10)
    assert page.status_code == 200
    found = _TOKEN.search(page.text)
    assert found, "no form token on the page"
    return found.group(1)


def test_page_matches_the_daemon(served: Served, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.base + "/status?refresh=off")
    assert browser.title == "otpd status"
    status = served.status()
    modems = status["channels"]["sms"]["modems"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#modems tr.modem")
    assert [r.get_attribute("data-name") for r in rows] == [m["name"] for m in modems]
    for row, modem in zip(rows, modems, strict=True):
        cell = row.find_element
        assert cell(By.CSS_SELECTOR, "td.state").text == modem["state"]
        assert cell(By.CSS_SELECTOR, "td.operator").text == modem["operator"]
        assert cell(By.CSS_SELECTOR, "td.sent").text == str(modem["sent"])
        bars = cell(By.CSS_SELECTOR, "svg.bars").get_attribute("data-bars")
        assert bars == str(signal_bars(modem["signal"])) and bars != "0"
        assert cell(By.CSS_SELECTOR, "td.sent-day").text == f"{SENT} of {SIM_CAP}"
        delivered = modem["delivery"]["delivered"]
        assert delivered == SENT
        assert cell(By.CSS_SELECTOR, "td.delivered-day").text == str(delivered)
        assert cell(By.CSS_SELECTOR, "td.recent").text.startswith(f"{delivered} of {SENT}")
    # The chart: 24 hours, their sums are what was sent and delivered.
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert chart.get_attribute("data-sent") == str(SENT)
    assert chart.get_attribute("data-delivered") == str(SENT)
    hours = chart.find_elements(By.CSS_SELECTOR, "g.hour")
    assert len(hours) == 24
    assert sum(int(h.get_attribute("data-sent") or 0) for h in hours) == SENT
    assert int(hours[-1].get_attribute("data-sent") or 0) == SENT  # all in this hour
    outbox = browser.find_element(By.ID, "outbox")
    assert outbox.get_attribute("data-pending") == str(status["pending"])
    # No broker configured in this daemon: the page says so.
    assert "No broker consumer configured" in browser.find_element(By.TAG_NAME, "body").text


def test_page_loads_nothing_from_elsewhere(served: Served, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.base + "/status?refresh=off")
    entries = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(str(name).startswith(served.base + "/") for name in entries), entries
    # Properties, not attributes: the URLs as the browser resolved them.
    linked = [e.get_property("src") or e.get_property("href")
              for e in browser.find_elements(By.CSS_SELECTOR, "[src], [href]")]
    assert linked and all(str(url).startswith(served.base + "/") for url in linked), linked
    assert not browser.find_elements(By.TAG_NAME, "script")
    for form in browser.find_elements(By.TAG_NAME, "form"):
        assert form.get_property("action") == served.base + "/status"


def test_security_headers(served: Served) -> None:
    page = requests.get(served.base + "/status", headers=APP, timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "style-src 'sha256-", "form-action 'self'",
                      "frame-ancestors 'none'", "base-uri 'none'"):
        assert directive in csp
    assert "script-src" not in csp  # none at all: default-src 'none'
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert page.headers["Cache-Control"] == "no-store"
    assert '<meta http-equiv="refresh" content="10; url=/status">' in page.text


def _wait_for_url(browser: WebDriver, url: str) -> None:
    """A click returns before the page it submits has loaded."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(expected_conditions.url_to_be(url))
    WebDriverWait(browser, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def _wait_for(browser: WebDriver, by: str, value: str) -> None:
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 10).until(expected_conditions.presence_of_element_located((by, value)))


def test_block_and_unblock_through_the_page(served: Served, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By

    number = "081299990001"
    assert not served.is_blocked("+6281299990001")
    browser.get(served.base + "/status?refresh=off")
    form = browser.find_element(By.ID, "block-form")
    form.find_element(By.NAME, "receiver").send_keys(number)
    form.find_element(By.TAG_NAME, "button").click()
    _wait_for_url(browser, served.base + "/status?done=blocked")
    assert browser.find_element(By.ID, "notice").text == "Receiver blocked."
    assert served.is_blocked("+6281299990001")

    form = browser.find_element(By.ID, "unblock-form")
    form.find_element(By.NAME, "receiver").send_keys("+62 812 9999 0001")
    form.find_element(By.TAG_NAME, "button").click()
    _wait_for_url(browser, served.base + "/status?done=unblocked")
    assert not served.is_blocked("+6281299990001")

    # A receiver that is not one: the page says why, nothing changes.
    form = browser.find_element(By.ID, "block-form")
    form.find_element(By.NAME, "receiver").send_keys("<b>not a number</b>")
    form.find_element(By.TAG_NAME, "button").click()
    _wait_for(browser, By.ID, "error")
    assert browser.find_element(By.ID, "error").text.startswith("block: receiver must be")
    assert browser.find_element(By.ID, "modems")  # the whole page, with the reason


class _Attacker(BaseHTTPRequestHandler):
    """Another origin's page with a form aimed at otpd's /status."""

    target = ""
    token = ""

    def do_GET(self) -> None:
        body = (f'<!DOCTYPE html><form id="f" method="post" action="{self.target}">'
                f'<input type="hidden" name="csrf" value="{self.token}">'
                '<input type="hidden" name="op" value="block">'
                '<input type="hidden" name="receiver" value="+6281299990002">'
                '<button id="go" type="submit">win a prize</button></form>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_cross_origin_form_is_refused(served: Served, browser: WebDriver) -> None:
    """Another site's form, even carrying a valid token and the user's credentials
    (the browser sends them itself), changes nothing."""
    from selenium.webdriver.common.by import By

    port = free_port()
    handler = type("Attacker", (_Attacker,), {"target": served.base + "/status",
                                              "token": _token(served, APP)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # "localhost" is another origin than "127.0.0.1".
        browser.get(f"http://localhost:{port}/")
        browser.find_element(By.ID, "go").click()
        _wait_for_url(browser, served.base + "/status")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Forbidden"
        assert "cross-origin" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not served.is_blocked("+6281299990002")


def test_posts_without_a_valid_token_are_refused(served: Served) -> None:
    url = served.base + "/status"
    origin = {"Origin": served.base}
    good = _token(served, APP)
    viewer = _auth(VIEWER, PASSWORD)
    target = "+6281299990003"
    cases: list[tuple[dict[str, str], dict[str, str], int]] = [
        ({**APP, **origin}, {"op": "block", "receiver": target}, 403),  # no token
        ({**APP, **origin}, {"csrf": "1.abc", "op": "block", "receiver": target}, 403),
        ({**APP, **origin}, {"csrf": good[:-1] + ("0" if good[-1] != "0" else "1"),
                             "op": "block", "receiver": target}, 403),  # tampered
        # The viewer's own token, in the app user's request: tokens are per user.
        ({**APP, **origin}, {"csrf": _token_of(served, viewer), "op": "block",
                             "receiver": target}, 403),
        ({**APP, "Origin": "http://evil.example"},
         {"csrf": good, "op": "block", "receiver": target}, 403),
        ({**APP, "Origin": "null"}, {"csrf": good, "op": "block", "receiver": target}, 403),
        (APP, {"csrf": good, "op": "block", "receiver": target}, 403),  # no Origin/Referer
        ({**APP, "Referer": "http://evil.example/status"},
         {"csrf": good, "op": "block", "receiver": target}, 403),
        # The viewer holds status-page but not block-msisdn.
        ({**viewer, **origin}, {"csrf": _token_of(served, viewer), "op": "block",
                                "receiver": target}, 403),
        ({**APP, **origin}, {"csrf": good, "op": "reboot", "receiver": target}, 400),
    ]
    for headers, form, expected in cases:
        answer = requests.post(url, data=form, headers=headers, timeout=10,
                               allow_redirects=False)
        assert answer.status_code == expected, (headers.get("Origin"), form, answer.text)
        assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert not served.is_blocked(target)
    # The same request with the token and the page's origin (or its Referer) works.
    for extra in (origin, {"Referer": served.base + "/status"}):
        answer = requests.post(url, data={"csrf": good, "op": "block", "receiver": target},
                               headers={**APP, **extra}, timeout=10, allow_redirects=False)
        assert answer.status_code == 303 and answer.headers["Location"] == "/status?done=blocked"
        assert served.is_blocked(target)
        service = served.run.daemon.service
        assert service is not None
        served.loop.run(service.unblock(target, by="test"))


def _token_of(served: Served, headers: dict[str, str]) -> str:
    """The form token a user gets; a user without forms gets one made the same way."""
    page = requests.get(served.base + "/status?refresh=off", headers=headers, timeout=10)
    assert page.status_code == 200
    found = _TOKEN.search(page.text)
    if found:
        return found.group(1)
    service = served.run.daemon.service
    assert service is not None
    user = base64.b64decode(headers["Authorization"].split()[1]).decode().split(":")[0]
    return csrf.make_token(csrf.derive_key(service.key), user, service.clock())


def test_grants_decide_who_sees_what(served: Served) -> None:
    url = served.base + "/status"
    plain = requests.get(url, headers=_auth(PLAIN, PASSWORD), timeout=10)
    assert plain.status_code == 403
    assert "status-page" in plain.text and "server.grants.plain" in plain.text
    assert plain.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "modem" not in plain.text.lower()
    anonymous = requests.get(url, timeout=10)
    assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
    wrong = requests.get(url, headers=_auth(API_USER, "wrong"), timeout=10)
    assert wrong.status_code == 401
    viewer = requests.get(url, headers=_auth(VIEWER, PASSWORD), timeout=10)
    assert viewer.status_code == 200
    assert "<form" not in viewer.text and 'id="modems"' in viewer.text
    app = requests.get(url, headers=APP, timeout=10)
    assert 'id="block-form"' in app.text and 'id="unblock-form"' in app.text
    # Nothing on the page identifies the SIM or the handset.
    modem = served.status()["channels"]["sms"]["modems"][0]
    for key in ("imsi", "imei"):
        if modem.get(key):
            assert str(modem[key]) not in app.text


# -- rendering alone (no browser) ------------------------------------------------------

def test_every_value_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    snapshot = {
        "now": 1_700_000_000.0,
        "status": {
            "pending": 1, "pending_by_channel": {"sms": 1}, "oldest_pending_age": 12.0,
            "channels": {"sms": {"delivery_window": 21600, "modems": [
                {"name": evil, "state": evil, "operator": evil, "last_error": evil,
                 "signal": {"csq": 18, "rssi_dbm": -77, "condition": evil},
                 "sent": 2, "failed": 1, "delivery": {"delivered": 1, "total": 2,
                                                      "delivered_ratio": 0.5}}]},
                "email": {"accounts": [{"name": evil, "healthy": False, "rest_reason": evil,
                                        "last_error": evil}]}},
            "brokers": [{"name": evil, "connected": True, "taking": False,
                         "not_taking": evil, "last_error": evil}],
        },
        "activity": [{"hour": 1_700_000_000 // 3600 * 3600, "channel": "sms", "via": evil,
                      "sent": 2, "failed": 0, "delivered": 1}],
        "failures": [{"id": 7, "channel": "sms", "receiver": "+62*******123",
                      "state": "failed", "code": evil, "reason": evil, "via": evil,
                      "attempts": 3, "created_at": 1_700_000_000.0}],
        "counts": {"blocked": 1},
        "sim_daily_max": 300,
        "error": evil,
    }
    viewer = Viewer(evil, '"><script>', can_block=True, can_unblock=True)
    page = render_page(snapshot, viewer, notice=evil, error=evil)
    assert "<script" not in page
    assert page.count("&lt;script&gt;") >= 15
    assert 'value="&quot;&gt;&lt;script&gt;"' in page
    assert "+62*******123" in page


def test_tokens() -> None:
    key = csrf.derive_key(b"k" * 32)
    assert key != b"k" * 32
    now = 1_700_000_000.0
    token = csrf.make_token(key, "app", now)
    assert csrf.token_valid(key, "app", token, now)
    assert csrf.token_valid(key, "app", token, now + csrf.WINDOW)  # the next window too
    assert not csrf.token_valid(key, "app", token, now + 2 * csrf.WINDOW)
    assert not csrf.token_valid(key, "app", token, now - csrf.WINDOW)
    assert not csrf.token_valid(key, "other", token, now)
    assert not csrf.token_valid(csrf.derive_key(b"x" * 32), "app", token, now)
    for bad in ("", ".", "abc", "1.", "x.y", "١٢.abc", token + "0", token.upper()):
        assert not csrf.token_valid(key, "app", bad, now)
    assert csrf.same_origin("http://127.0.0.1:8899", None, "127.0.0.1:8899", False)
    assert csrf.same_origin("https://otp.example", None, "otp.example", True)
    assert csrf.same_origin(None, "http://127.0.0.1:8899/status", "127.0.0.1:8899", False)
    assert not csrf.same_origin("http://otp.example", None, "otp.example", True)
    assert not csrf.same_origin("null", None, "127.0.0.1:8899", False)
    assert not csrf.same_origin(None, None, "127.0.0.1:8899", False)
    assert not csrf.same_origin("http://evil@127.0.0.1:8899", None, "127.0.0.1:8899", False)
    # Origin decides when present, whatever the Referer says.
    assert not csrf.same_origin("http://evil.example", "http://127.0.0.1:8899/",
                                "127.0.0.1:8899", False)
