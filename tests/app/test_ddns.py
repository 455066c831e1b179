"""Dynamic DNS against local HTTP servers that answer as the providers do:
a plain-text "what is my IP" service, a dyndns2 update server and the part of
the Cloudflare API v4 that otpd uses. Nothing leaves the loopback interface."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import socket
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web

from otpd.app.ddns import DdnsUpdater, resolve_addresses
from otpd.app.ddns_settings import DdnsSettings, parse_ddns_settings, valid_hostname
from otpd.settings_reader import Section

PASSWORD = "pw-" + uuid.uuid4().hex
TOKEN = "tok-" + uuid.uuid4().hex
ZONE = "0123456789abcdef0123456789abcdef"


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@dataclass
class Server:
    """An aiohttp application on a free loopback port."""

    app: web.Application
    host: str = "127.0.0.1"
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class IpService:
    body: str = "203.0.113.7"
    status: int = 200
    hits: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text=self.body + "\n", status=self.status)

        app = web.Application()
        app.router.add_get("/ip", handle)
        return app


@dataclass
class Dyndns2:
    """Answers /nic/update as No-IP/Dynu/DynDNS do."""

    username: str = "pi-user"
    password: str = PASSWORD
    answers: list[tuple[int, str]] = field(default_factory=list)  # consumed first
    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def update(request: web.Request) -> web.Response:
            loop = asyncio.get_running_loop()
            auth = request.headers.get("Authorization", "")
            self.requests.append({
                "hostname": request.query.get("hostname", ""),
                "myip": request.query.get("myip", ""),
                "agent": request.headers.get("User-Agent", ""),
                "auth": auth,
                "at": loop.time(),
            })
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if auth != f"Basic {expected}":
                return web.Response(text="badauth", status=401)
            if self.answers:
                status, text = self.answers.pop(0)
                return web.Response(text=text.format(ip=request.query["myip"]), status=status)
            hosts = request.query["hostname"].split(",")
            return web.Response(text="\n".join(f"good {request.query['myip']}" for _ in hosts))

        app = web.Application()
        app.router.add_get("/nic/update", update)
        return app


@dataclass
class Cloudflare:
    """The DNS-record part of the Cloudflare API v4, with a bearer token."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def add(self, name: str, content: str, rtype: str = "A") -> str:
        rid = uuid.uuid4().hex
        self.records[rid] = {"id": rid, "type": rtype, "name": name, "content": content,
                             "ttl": 1, "proxied": False}
        return rid

    @staticmethod
    def answer(result: Any, status: int = 200) -> web.Response:
        return web.json_response({"success": status < 300, "errors": [], "messages": [],
                                  "result": result}, status=status)

    def app(self) -> web.Application:
        @web.middleware
        async def checks(request: web.Request, handler: Any) -> web.StreamResponse:
            self.calls.append((request.method, request.path_qs))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response({"success": False, "errors": [
                    {"code": 10000, "message": "Authentication error"}], "result": None},
                    status=403)
            if request.match_info.get("zone") != ZONE:
                return web.json_response({"success": False, "errors": [
                    {"code": 7003, "message": "Could not route to /zones/x, perhaps your"
                     " object identifier is invalid?"}], "result": None}, status=404)
            if self.failures:
                status, body, headers = self.failures.pop(0)
                return web.json_response(body, status=status, headers=headers)
            response: web.StreamResponse = await handler(request)
            return response

        async def listing(request: web.Request) -> web.Response:
            found = [r for r in self.records.values()
                     if r["name"] == request.query.get("name")
                     and r["type"] == request.query.get("type")]
            return self.answer(found)

        async def create(request: web.Request) -> web.Response:
            body = await request.json()
            rid = uuid.uuid4().hex
            self.records[rid] = {"id": rid, **body}
            return self.answer(self.records[rid])

        async def patch(request: web.Request) -> web.Response:
            rid = request.match_info["rid"]
            if rid not in self.records:
                return self.answer(None, status=404)
            self.records[rid].update(await request.json())
            return self.answer(self.records[rid])

        app = web.Application(middlewares=[checks])
        app.router.add_get("/client/v4/zones/{zone}/dns_records", listing)
        app.router.add_post("/client/v4/zones/{zone}/dns_records", create)
        app.router.add_patch("/client/v4/zones/{zone}/dns_records/{rid}", patch)
        return app


@dataclass
class Env:
    ip: IpService
    ip_server: Server
    dyndns: Dyndns2
    dyndns_server: Server
    cf: Cloudflare
    cf_server: Server
    updaters: list[DdnsUpdater] = field(default_factory=list)

    def dyndns2_settings(self, **changes: Any) -> DdnsSettings:
        base = DdnsSettings(
            provider="noip", hostnames=("pi.example.net",), ip_url=f"{self.ip_server.url}/ip",
            interval=0.1, timeout=2.0, retry_min=0.05, retry_max=0.2,
            server=self.dyndns_server.url, username="pi-user", password=PASSWORD,
        )
        return replace(base, **changes)

    def cloudflare_settings(self, **changes: Any) -> DdnsSettings:
        base = DdnsSettings(
            provider="cloudflare", hostnames=("otp.example.com",),
            ip_url=f"{self.ip_server.url}/ip", interval=0.1, timeout=2.0, retry_min=0.05,
            retry_max=0.2, zone_id=ZONE, api_token=TOKEN,
            api_url=f"{self.cf_server.url}/client/v4",
        )
        return replace(base, **changes)

    async def updater(self, settings: DdnsSettings, dns: set[str] | None = None) -> DdnsUpdater:
        async def resolve(host: str, family: socket.AddressFamily) -> set[str]:
            return set(dns or ())

        u = DdnsUpdater(settings, resolve=resolve)
        self.updaters.append(u)
        await u.start()
        return u


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    ip, dyndns, cf = IpService(), Dyndns2(), Cloudflare()
    servers = [Server(ip.app()), Server(dyndns.app()), Server(cf.app())]
    for s in servers:
        await s.start()
    e = Env(ip, servers[0], dyndns, servers[1], cf, servers[2])
    yield e
    for u in e.updaters:
        await u.stop()
    for s in servers:
        await s.stop()


# -- dyndns2 -------------------------------------------------------------------

async def test_dyndns2_updates_once_and_again_only_on_change(env: Env) -> None:
    u = await env.updater(env.dyndns2_settings(user_agent="otpd-test/1.0 ops@example.com"))
    await until(lambda: u.status()["state"] == "ok")
    (req,) = env.dyndns.requests
    assert req["hostname"] == "pi.example.net"
    assert req["myip"] == "203.0.113.7"
    assert req["agent"] == "otpd-test/1.0 ops@example.com"
    hits = env.ip.hits
    await until(lambda: env.ip.hits >= hits + 3)  # three more checks ...
    assert len(env.dyndns.requests) == 1  # ... and no update: the IP is the same
    st = u.status()
    assert st["public_ip"] == st["synced_ip"] == "203.0.113.7"
    assert st["updates"] == 1 and st["last_result"] == "pi.example.net: good 203.0.113.7"

    env.ip.body = "198.51.100.23"
    await until(lambda: len(env.dyndns.requests) == 2)
    assert env.dyndns.requests[1]["myip"] == "198.51.100.23"
    await until(lambda: u.status()["synced_ip"] == "198.51.100.23")
    assert u.status()["updates"] == 2


async def test_dyndns2_start_compares_with_dns(env: Env) -> None:
    u = await env.updater(env.dyndns2_settings(), dns={"203.0.113.7"})
    await until(lambda: env.ip.hits >= 3)
    assert env.dyndns.requests == []
    assert u.status()["synced_ip"] == "203.0.113.7"
    assert u.status()["last_result"] == "DNS already answers 203.0.113.7"
    env.ip.body = "203.0.113.8"
    await until(lambda: len(env.dyndns.requests) == 1)
    assert env.dyndns.requests[0]["myip"] == "203.0.113.8"


async def test_dyndns2_stale_dns_means_update(env: Env) -> None:
    await env.updater(env.dyndns2_settings(), dns={"192.0.2.1"})
    await until(lambda: len(env.dyndns.requests) == 1)


async def test_real_resolver_on_localhost(env: Env) -> None:
    assert await resolve_addresses("localhost", socket.AF_INET) == {"127.0.0.1"}
    assert await resolve_addresses("no-such-name.invalid", socket.AF_INET) == set()
    env.ip.body = "127.0.0.1"
    u = DdnsUpdater(env.dyndns2_settings(hostnames=("localhost",)))
    env.updaters.append(u)
    await u.start()
    await until(lambda: env.ip.hits >= 2)
    assert env.dyndns.requests == []
    assert u.status()["state"] == "ok"


async def test_dyndns2_several_names_in_one_request(env: Env) -> None:
    env.dyndns.answers.append((200, "good {ip}\nnochg {ip}"))
    u = await env.updater(env.dyndns2_settings(hostnames=("a.example.net", "b.example.net")))
    await until(lambda: u.status()["state"] == "ok")
    assert env.dyndns.requests[0]["hostname"] == "a.example.net,b.example.net"
    assert u.status()["last_result"] == ("a.example.net: good 203.0.113.7; "
                                         "b.example.net: nochg 203.0.113.7")


async def test_nochg_counts_as_in_sync(env: Env) -> None:
    env.dyndns.answers.append((200, "nochg {ip}"))
    u = await env.updater(env.dyndns2_settings())
    await until(lambda: u.status()["state"] == "ok")
    assert u.status()["synced_ip"] == "203.0.113.7"
    assert u.status()["updates"] == 0  # nothing changed at the provider
    await until(lambda: env.ip.hits >= 3)
    assert len(env.dyndns.requests) == 1


@pytest.mark.parametrize(("answer", "advice"), [
    ("badauth", "check ddns.username and ddns.password"),
    ("nohost", "check ddns.hostnames"),
    ("abuse", "unblock it in the provider's web account"),
    ("notfqdn", "use the full name"),
    ("badagent", "set ddns.user_agent"),
    ("!donator", "feature the account does not have"),
])
async def test_operator_answers_stop_until_reload(env: Env, caplog: pytest.LogCaptureFixture,
                                                  answer: str, advice: str) -> None:
    caplog.set_level(logging.DEBUG)
    env.dyndns.answers.append((200, answer))
    u = await env.updater(env.dyndns2_settings())
    await until(lambda: u.status()["state"] == "stopped")
    await asyncio.sleep(0.5)  # five intervals, and no retry
    assert len(env.dyndns.requests) == 1
    st = u.status()
    assert st["next_check"] is None
    assert repr(answer) in st["error"] and advice in st["error"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert advice in errors[0].getMessage()
    assert "until the configuration is reloaded" in errors[0].getMessage()
    assert PASSWORD not in caplog.text

    await u.reconfigure(u.settings)  # the operator fixed it and reloaded
    await until(lambda: u.status()["state"] == "ok")
    assert len(env.dyndns.requests) == 2


async def test_http_401_is_badauth(env: Env) -> None:
    u = await env.updater(env.dyndns2_settings(password="wrong"))
    await until(lambda: u.status()["state"] == "stopped")
    assert "'badauth'" in u.status()["error"]
    assert len(env.dyndns.requests) == 1


@pytest.mark.parametrize("answer", ["911", "dnserr"])
async def test_provider_trouble_waits_the_protocols_delay(env: Env, answer: str) -> None:
    env.dyndns.answers.append((200, answer))
    u = await env.updater(env.dyndns2_settings(provider_down_delay=0.4))
    await until(lambda: len(env.dyndns.requests) == 2)
    first, second = env.dyndns.requests
    assert second["at"] - first["at"] >= 0.38  # not retry_min (0.05)
    await until(lambda: u.status()["state"] == "ok")


async def test_server_errors_back_off_exponentially(env: Env) -> None:
    env.dyndns.answers.extend([(500, "<html>Internal Server Error</html>")] * 3)
    u = await env.updater(env.dyndns2_settings(retry_min=0.1, retry_max=0.3, interval=5.0))
    await until(lambda: u.status()["failures"] == 1)
    assert u.status()["state"] == "retrying"
    assert "HTTP 500" in u.status()["error"]
    await until(lambda: len(env.dyndns.requests) == 4)
    at = [r["at"] for r in env.dyndns.requests]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.29  # 0.1, 0.2, capped 0.3
    await until(lambda: u.status()["state"] == "ok")
    assert u.status()["failures"] == 0 and u.status()["error"] is None


def test_backoff_doubles_up_to_the_cap() -> None:
    u = DdnsUpdater(DdnsSettings(provider="noip", hostnames=("a.example.net",),
                                 retry_min=60, retry_max=3600))
    assert [u.backoff(n) for n in (1, 2, 3, 6, 7, 100)] == [60, 120, 240, 1920, 3600, 3600]


async def test_unreachable_provider_is_retried(env: Env) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    u = await env.updater(env.dyndns2_settings(server=closed))
    await until(lambda: u.status()["failures"] >= 2)
    assert u.status()["state"] == "retrying"
    assert "cannot reach 127.0.0.1" in u.status()["error"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("<html>your ip: 1.2.3.4</html>", 200, "did not answer a plain IP address"),
    ("203.0.113.300", 200, "did not answer a plain IP address"),
    ("", 200, "did not answer a plain IP address"),
    ("203.0.113.7", 503, "answered HTTP 503"),
    ("2001:db8::7", 200, "not an IPv4 address"),
])
async def test_bad_ip_service_answers_send_nothing(env: Env, body: str, status: int,
                                                   needle: str) -> None:
    env.ip.body, env.ip.status = body, status
    u = await env.updater(env.dyndns2_settings())
    await until(lambda: u.status()["failures"] >= 2)
    assert env.dyndns.requests == []
    assert needle in u.status()["error"] and "ddns.ip_url" in u.status()["error"]
    env.ip.body, env.ip.status = "203.0.113.9", 200
    await until(lambda: u.status()["state"] == "ok")
    assert [r["myip"] for r in env.dyndns.requests] == ["203.0.113.9"]


async def test_disabled_updater_does_nothing(env: Env) -> None:
    u = await env.updater(env.dyndns2_settings(enabled=False))
    await asyncio.sleep(0.2)
    assert env.ip.hits == 0
    assert u.status()["state"] == "disabled"


# -- Cloudflare ------------------------------------------------------------------

async def test_cloudflare_record_already_right_is_left_alone(env: Env) -> None:
    env.cf.add("otp.example.com", "203.0.113.7")
    u = await env.updater(env.cloudflare_settings())
    await until(lambda: u.status()["state"] == "ok")
    await until(lambda: env.ip.hits >= 3)
    assert [m for m, _ in env.cf.calls] == ["GET"]
    assert u.status()["last_result"] == "records already point at 203.0.113.7"


async def test_cloudflare_patches_a_stale_record_and_follows_changes(env: Env) -> None:
    rid = env.cf.add("otp.example.com", "192.0.2.10")
    env.cf.add("other.example.com", "192.0.2.10")
    u = await env.updater(env.cloudflare_settings())
    await until(lambda: u.status()["state"] == "ok")
    assert env.cf.records[rid]["content"] == "203.0.113.7"
    assert [m for m, _ in env.cf.calls] == ["GET", "PATCH"]
    assert "type=A" in env.cf.calls[0][1] and "name=otp.example.com" in env.cf.calls[0][1]
    assert env.cf.calls[1][1].endswith(f"/dns_records/{rid}")

    env.ip.body = "203.0.113.99"
    await until(lambda: env.cf.records[rid]["content"] == "203.0.113.99")
    assert [m for m, _ in env.cf.calls] == ["GET", "PATCH", "GET", "PATCH"]
    assert u.status()["updates"] == 2
    other = [r for r in env.cf.records.values() if r["name"] == "other.example.com"]
    assert other[0]["content"] == "192.0.2.10"


async def test_cloudflare_creates_a_missing_record(env: Env) -> None:
    u = await env.updater(env.cloudflare_settings(ttl=120, proxied=False))
    await until(lambda: u.status()["state"] == "ok")
    (record,) = env.cf.records.values()
    assert {k: record[k] for k in ("type", "name", "content", "ttl", "proxied")} == {
        "type": "A", "name": "otp.example.com", "content": "203.0.113.7", "ttl": 120,
        "proxied": False}


async def test_cloudflare_aaaa_over_ipv6(env: Env) -> None:
    ip6 = IpService(body="2001:db8::5")
    server = Server(ip6.app(), host="::1")
    await server.start()
    try:
        rid = env.cf.add("otp.example.com", "2001:db8::1", rtype="AAAA")
        env.cf.add("otp.example.com", "192.0.2.10", rtype="A")
        u = await env.updater(env.cloudflare_settings(record_type="AAAA",
                                                      ip_url=f"{server.url}/ip"))
        await until(lambda: u.status()["state"] == "ok")
        assert env.cf.records[rid]["content"] == "2001:db8::5"
        assert "type=AAAA" in env.cf.calls[0][1]
    finally:
        await server.stop()


@pytest.mark.parametrize(("changes", "needle"), [
    ({"api_token": "not-the-token"}, "check ddns.api_token"),
    ({"zone_id": "f" * 32}, "check ddns.zone_id"),
])
async def test_cloudflare_token_or_zone_wrong_stops(env: Env, caplog: pytest.LogCaptureFixture,
                                                    changes: dict[str, str],
                                                    needle: str) -> None:
    caplog.set_level(logging.DEBUG)
    u = await env.updater(env.cloudflare_settings(**changes))
    await until(lambda: u.status()["state"] == "stopped")
    await asyncio.sleep(0.4)
    assert len(env.cf.calls) == 1
    assert needle in u.status()["error"]
    assert TOKEN not in caplog.text and "not-the-token" not in caplog.text
    assert TOKEN not in json.dumps(u.status())


async def test_cloudflare_transient_errors_are_retried(env: Env) -> None:
    env.cf.failures.append((500, {"success": False, "errors": [
        {"code": 1000, "message": "internal"}]}, {}))
    env.cf.failures.append((429, {"success": False, "errors": [
        {"code": 971, "message": "Please wait and consider throttling your request speed"}]},
        {"Retry-After": "0"}))
    rid = env.cf.add("otp.example.com", "192.0.2.10")
    u = await env.updater(env.cloudflare_settings())
    await until(lambda: u.status()["failures"] >= 1)
    assert "HTTP 500" in u.status()["error"] or "HTTP 429" in u.status()["error"]
    await until(lambda: u.status()["state"] == "ok")
    assert env.cf.records[rid]["content"] == "203.0.113.7"


# -- settings --------------------------------------------------------------------

def parse(text: str) -> tuple[DdnsSettings | None, list[str]]:
    data = tomllib.loads(text)
    errors: list[str] = []
    root = Section(data, "", errors)
    settings = parse_ddns_settings(root.section("ddns"))
    return settings, errors


def test_no_table_no_settings() -> None:
    assert parse("") == (None, [])
    assert parse_ddns_settings(None) is None


def test_noip_preset_and_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTPD_DDNS_PW", PASSWORD)
    settings, errors = parse("""
        [ddns]
        provider = "noip"
        hostnames = ["Pi.DDNS.net."]
        username = "me@example.com"
        password_env = "OTPD_DDNS_PW"
        interval = 600
    """)
    assert errors == []
    assert settings is not None
    assert settings.server == "https://dynupdate.no-ip.com"
    assert settings.hostnames == ("pi.ddns.net",)
    assert settings.password == PASSWORD and settings.protocol == "dyndns2"
    assert settings.interval == 600 and settings.check_dns
    assert PASSWORD not in repr(settings)


def test_cloudflare_settings(tmp_path: Any) -> None:
    token_file = tmp_path / "cf.token"
    token_file.write_text(TOKEN + "\n")
    settings, errors = parse(f"""
        [ddns]
        provider = "cloudflare"
        hostnames = ["otp.example.com", "api.example.com"]
        record_type = "AAAA"
        ip_url = "https://api6.ipify.org"
        zone_id = "{ZONE}"
        api_token_file = "{token_file}"
        ttl = 300
        proxied = false
    """)
    assert errors == []
    assert settings is not None
    assert settings.api_token == TOKEN and settings.ttl == 300
    assert settings.api_url == "https://api.cloudflare.com/client/v4"
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(("body", "expected"), [
    ('hostnames = ["a.example.net"]\nusername = "u"\npassword = "p"',
     "ddns.provider: is required"),
    ('provider = "route53"\nhostnames = ["a.example.net"]', "ddns.provider: must be one of"),
    ('provider = "noip"\nusername = "u"\npassword = "p"', "ddns.hostnames: is required"),
    ('provider = "noip"\nhostnames = ["pi"]\nusername = "u"\npassword = "p"',
     "ddns.hostnames: 'pi' is not a fully qualified host name"),
    ('provider = "noip"\nhostnames = ["a.example.net", "a.example.net"]\nusername = "u"\n'
     'password = "p"', "ddns.hostnames: lists a name twice"),
    ('provider = "dyndns2"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"',
     "ddns.server: is required"),
    ('provider = "dyndns2"\nserver = "ftp://x"\nhostnames = ["a.example.net"]\nusername = "u"\n'
     'password = "p"', "ddns.server: must be an http:// or https:// URL"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\npassword = "p"',
     "ddns.username: is required"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"',
     "ddns.password: is required"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword_env = "NOPE_X"',
     "ddns.password_env: environment variable NOPE_X is not set"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'zone_id = "x"', "ddns.zone_id: is not used with provider = 'noip'"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'intervall = 60', "ddns.intervall: unknown key"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'interval = 5', "ddns.interval: must be 30.0..86400.0"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'retry_min = 600\nretry_max = 60', "ddns.retry_max: must be >= ddns.retry_min"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'ip_url = "https://me:pw@ip.example"', "ddns.ip_url: must not carry credentials"),
    ('provider = "noip"\nhostnames = ["a.example.net"]\nusername = "u"\npassword = "p"\n'
     'record_type = "MX"', "ddns.record_type: must be one of 'A', 'AAAA'"),
    ('provider = "cloudflare"\nhostnames = ["a.example.net"]\napi_token = "t"',
     "ddns.zone_id: is required"),
    ('provider = "cloudflare"\nhostnames = ["a.example.net"]\napi_token = "t"\n'
     'zone_id = "example.net"', "ddns.zone_id: must be the zone's 32 hex digit ID"),
    (f'provider = "cloudflare"\nhostnames = ["a.example.net"]\nzone_id = "{ZONE}"',
     "ddns.api_token: is required"),
    (f'provider = "cloudflare"\nhostnames = ["a.example.net"]\nzone_id = "{ZONE}"\n'
     'api_token = "t"\nttl = 10', "ddns.ttl: must be 1 (automatic) or 30..86400"),
    (f'provider = "cloudflare"\nhostnames = ["a.example.net"]\nzone_id = "{ZONE}"\n'
     'api_token = "t"\nusername = "u"', "ddns.username: is not used with provider"),
])
def test_settings_errors_name_the_key(body: str, expected: str) -> None:
    _, errors = parse("[ddns]\n" + body)
    assert any(e.startswith(expected) for e in errors), errors


def test_disabled_table_is_still_checked() -> None:
    settings, errors = parse('[ddns]\nenabled = false\nprovider = "noip"\n'
                             'hostnames = ["a.example.net"]\nusername = "u"\npassword = "p"')
    assert errors == [] and settings is not None and not settings.enabled


@pytest.mark.parametrize(("name", "ok"), [
    ("pi.ddns.net", True), ("a-b.example.co.id", True), ("x.example.", True),
    ("localhost", False), ("-a.example.net", False), ("a..example.net", False),
    ("a_b.example.net", False), ("ü.example.net", False), ("a" * 64 + ".example.net", False),
])
def test_valid_hostname(name: str, ok: bool) -> None:
    assert valid_hostname(name) is ok
