"""Dynamic DNS: keep ``[ddns] hostnames`` pointed at the Pi's public IP.

Every ``interval`` the public address is fetched from ``ip_url`` (a plain
text body that must parse as an IPv4 address for A records, IPv6 for AAAA).
The provider is called only when that address differs from the one it was
last set to; at start the provider's current record is compared first
(Cloudflare: the DNS record itself; dyndns2: what DNS answers for the names),
so a restart does not send a needless update.

Protocols:

- dyndns2 (No-IP, Dynu, DynDNS, FreeDNS and others):
  ``GET <server>/nic/update?hostname=a,b&myip=IP`` with HTTP Basic auth; one
  answer line per name: ``good IP``/``nochg IP`` succeed; ``badauth``,
  ``nohost``, ``notfqdn``, ``abuse``, ``badagent``, ``!donator``, ``!yours``,
  ``numhost`` need the operator, so updating stops until the configuration
  is reloaded; ``911``/``dnserr`` are the provider's trouble: wait at least
  30 minutes, as the protocol asks.
- Cloudflare API v4: list the name's A/AAAA records in the zone, ``PATCH``
  the record whose address is stale, ``POST`` one when there is none; bearer
  token. 401/403/404 (token or zone wrong) stop updating until reload.

Other failures (network, HTTP 5xx, 429, a bad ``ip_url`` answer) are retried
with exponential backoff from ``retry_min`` to ``retry_max``. Passwords and
tokens are never logged or shown in :meth:`DdnsUpdater.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from otpd.app.ddns_settings import DdnsSettings
from otpd.netutil import basic_authorization

log = logging.getLogger("otpd.app.ddns")

Resolver = Callable[[str, socket.AddressFamily], Awaitable[set[str]]]

_MAX_IP_BODY = 256
_MAX_API_BODY = 1024 * 1024

# dyndns2 answers that only the operator can fix: what to do about each.
_DYNDNS2_FATAL = {
    "badauth": "the provider refused the username or password: check ddns.username and"
               " ddns.password (No-IP and Dynu accept the account's or an update-only password)",
    "nohost": "the host name does not exist in this account: check ddns.hostnames against"
              " the names in the provider's web account",
    "notfqdn": "the host name is not a fully qualified domain name: use the full name,"
               " e.g. pi.ddns.net",
    "abuse": "the provider has blocked updates for this name for abuse (too many updates);"
             " unblock it in the provider's web account",
    "badagent": "the provider refused this client's User-Agent: set ddns.user_agent to"
                " 'name/version contact'",
    "!donator": "the update asked for a feature the account does not have",
    "!yours": "the host name belongs to another account",
    "numhost": "too many host names in one update: list fewer in ddns.hostnames",
}
# dyndns2 answers about the provider's own trouble.
_DYNDNS2_PROVIDER_DOWN = {
    "911": "the provider reports a server problem (911)",
    "dnserr": "the provider reports a DNS error on its side (dnserr)",
}


class DdnsError(Exception):
    """An update cycle failed. ``fatal``: only the operator can fix it, so
    updating stops until the configuration is reloaded. ``min_delay``: the
    shortest wait before a retry that the provider asks for."""

    def __init__(self, message: str, *, fatal: bool = False, min_delay: float = 0.0) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.min_delay = min_delay


async def resolve_addresses(host: str, family: socket.AddressFamily) -> set[str]:
    """The addresses DNS answers for ``host`` (empty when it does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {str(info[4][0]) for info in infos}


class DdnsUpdater:
    """Runs the update loop for one ``[ddns]`` table."""

    def __init__(
        self,
        settings: DdnsSettings,
        *,
        resolve: Resolver = resolve_addresses,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._resolve = resolve
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._api: aiohttp.ClientSession | None = None
        self._ip: aiohttp.ClientSession | None = None
        self._reset()

    def _reset(self) -> None:
        self._state = "idle"
        self._public_ip: str | None = None
        self._synced_ip: str | None = None
        self._last_update: float | None = None
        self._last_result: str | None = None
        self._last_error: str | None = None
        self._last_check: float | None = None
        self._next_check: float | None = None
        self._failures = 0
        self._updates = 0

    # -- life cycle ----------------------------------------------------------
    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.settings.record_type == "AAAA" else socket.AF_INET

    async def start(self) -> None:
        if self._task is not None:
            return
        if not self.settings.enabled:
            self._state = "disabled"
            return
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        headers = {"User-Agent": self.settings.user_agent}
        self._api = aiohttp.ClientSession(timeout=timeout, headers=headers)
        # The address the IP service sees depends on the connection's family:
        # ask over the family of the record being kept.
        self._ip = aiohttp.ClientSession(
            timeout=timeout, headers=headers,
            connector=aiohttp.TCPConnector(family=self.family),
        )
        self._state = "starting"
        self._task = asyncio.create_task(self._run(), name="ddns")
        log.info("keeping %s (%s) up to date via %s", ", ".join(self.settings.hostnames),
                 self.settings.record_type, self.settings.provider)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in (self._api, self._ip):
            if session is not None:
                await session.close()
        self._api = self._ip = None
        if self._state not in ("stopped", "disabled"):
            self._state = "idle"

    async def reconfigure(self, settings: DdnsSettings) -> None:
        """Apply reloaded settings; also clears a stop after a fatal answer."""
        await self.stop()
        self.settings = settings
        self._reset()
        await self.start()

    def status(self) -> dict[str, Any]:
        s = self.settings
        return {
            "enabled": s.enabled,
            "provider": s.provider,
            "hostnames": list(s.hostnames),
            "record_type": s.record_type,
            "state": self._state,
            "public_ip": self._public_ip,
            "synced_ip": self._synced_ip,
            "last_check": self._last_check,
            "last_update": self._last_update,
            "last_result": self._last_result,
            "error": self._last_error,
            "failures": self._failures,
            "updates": self._updates,
            "next_check": self._next_check,
        }

    # -- the loop ------------------------------------------------------------
    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures`` (1, 2, ...)."""
        s = self.settings
        return float(min(s.retry_max, s.retry_min * 2 ** min(failures - 1, 32)))

    async def _run(self) -> None:
        s = self.settings
        while True:
            try:
                await self.sync()
            except DdnsError as exc:
                self._last_error = str(exc)
                if exc.fatal:
                    self._state = "stopped"
                    self._next_check = None
                    log.error("%s. Updates are stopped until the configuration is reloaded"
                              " (systemctl reload otpd).", exc)
                    return
                self._failures += 1
                self._state = "retrying"
                delay = max(self.backoff(self._failures), exc.min_delay)
                log.warning("%s; retrying in %.0f s", exc, delay)
            else:
                self._failures = 0
                self._last_error = None
                self._state = "ok"
                delay = s.interval
            self._next_check = self._clock() + delay
            await asyncio.sleep(delay)

    async def sync(self) -> bool:
        """One cycle: find the public IP and update the provider if needed.
        True when an update was sent. Raises :class:`DdnsError`."""
        ip = await self.public_ip()
        self._last_check = self._clock()
        if self._public_ip != ip:
            log.info("public IP is %s", ip)
        self._public_ip = ip
        if ip == self._synced_ip:
            return False
        if self.settings.protocol == "cloudflare":
            changed = await self._cloudflare(ip)
        else:
            changed = await self._dyndns2(ip, first=self._synced_ip is None)
        self._synced_ip = ip
        if changed:
            self._updates += 1
            self._last_update = self._clock()
        return changed

    # -- public IP -----------------------------------------------------------
    async def public_ip(self) -> str:
        s = self.settings
        assert self._ip is not None, "start() first"
        try:
            async with self._ip.get(s.ip_url) as resp:
                body = await resp.content.read(_MAX_IP_BODY + 1)
                if resp.status != 200:
                    raise DdnsError(f"ddns.ip_url: {s.ip_url} answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DdnsError(f"ddns.ip_url: cannot fetch {s.ip_url}: {_describe(exc)}") from None
        want = 6 if s.record_type == "AAAA" else 4
        text = body.decode("ascii", "replace").strip()
        try:
            if len(body) > _MAX_IP_BODY:
                raise ValueError
            address = ipaddress.ip_address(text)
        except ValueError:
            raise DdnsError(f"ddns.ip_url: {s.ip_url} did not answer a plain IP address"
                            f" (got {_preview(text)})") from None
        if address.version != want:
            raise DdnsError(f"ddns.ip_url: {s.ip_url} answered {address}, not an IPv{want}"
                            f" address as record_type = {s.record_type!r} needs")
        if not address.is_global:
            log.warning("%s answered %s, which is not a public address", s.ip_url, address)
        return str(address)

    # -- dyndns2 -------------------------------------------------------------
    async def _dyndns2(self, ip: str, *, first: bool) -> bool:
        s = self.settings
        if first and s.check_dns:
            current = [await self._resolve(h, self.family) for h in s.hostnames]
            if all(current) and all(addrs == {ip} for addrs in current):
                self._last_result = f"DNS already answers {ip}"
                log.info("%s already point at %s; no update needed",
                         ", ".join(s.hostnames), ip)
                return False
        assert self._api is not None
        url = f"{s.server}/nic/update"
        params = {"hostname": ",".join(s.hostnames), "myip": ip}
        headers = {"Authorization": basic_authorization(s.username, s.password)}
        where = urlsplit(s.server).hostname
        try:
            async with self._api.get(url, params=params, headers=headers) as resp:
                status = resp.status
                body = (await resp.content.read(64 * 1024)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DdnsError(f"cannot reach {where}: {_describe(exc)}") from None
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        if not lines:
            if status == 401:
                lines = ["badauth"]
            else:
                raise DdnsError(f"{where} answered HTTP {status} with no update result")
        answers = [lines[min(i, len(lines) - 1)] for i in range(len(s.hostnames))]
        results: list[str] = []
        for host, answer in zip(s.hostnames, answers, strict=True):
            code = answer.split()[0]
            if code in ("good", "nochg"):
                results.append(f"{host}: {answer}")
                continue
            if code in _DYNDNS2_FATAL:
                raise DdnsError(f"{where} answered {code!r} for {host}: {_DYNDNS2_FATAL[code]}",
                                fatal=True)
            if code in _DYNDNS2_PROVIDER_DOWN:
                raise DdnsError(f"{where}: {_DYNDNS2_PROVIDER_DOWN[code]} for {host}",
                                min_delay=s.provider_down_delay)
            raise DdnsError(f"{where} answered HTTP {status}, {_preview(answer)!s} for {host}")
        self._last_result = "; ".join(results)
        changed = any(r.split(": ", 1)[1].startswith("good") for r in results)
        log.info("%s", self._last_result)
        return changed

    # -- Cloudflare ----------------------------------------------------------
    async def _cf_call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: dict[str, Any] | None = None) -> Any:
        s = self.settings
        assert self._api is not None
        headers = {"Authorization": f"Bearer {s.api_token}"}
        try:
            async with self._api.request(method, f"{s.api_url}{path}", params=params, json=body,
                                         headers=headers) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After", "")
                raw = await resp.content.read(_MAX_API_BODY)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DdnsError(f"cannot reach the Cloudflare API: {_describe(exc)}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        messages = _cf_errors(doc)
        detail = f" ({messages})" if messages else ""
        if status in (401, 403):
            raise DdnsError(
                f"Cloudflare refused the API token (HTTP {status}){detail}: check ddns.api_token;"
                " it needs Zone.DNS Edit permission on the zone", fatal=True)
        if status in (400, 404):
            raise DdnsError(
                f"Cloudflare answered HTTP {status} for {method} {path}{detail}: check"
                " ddns.zone_id (the zone's ID, not its name) and ddns.hostnames", fatal=True)
        if status == 429:
            delay = float(retry_after) if retry_after.isdigit() else 0.0
            raise DdnsError(f"Cloudflare rate limit (HTTP 429){detail}", min_delay=delay)
        if status >= 300 or not isinstance(doc, dict) or doc.get("success") is not True:
            raise DdnsError(f"Cloudflare answered HTTP {status}{detail}")
        return doc.get("result")

    async def _cloudflare(self, ip: str) -> bool:
        s = self.settings
        base = f"/zones/{s.zone_id}/dns_records"
        changed: list[str] = []
        for host in s.hostnames:
            found = await self._cf_call("GET", base, params={"type": s.record_type, "name": host})
            records = [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []
            if not records:
                await self._cf_call("POST", base, body={
                    "type": s.record_type, "name": host, "content": ip, "ttl": s.ttl,
                    "proxied": s.proxied, "comment": "kept up to date by otpd",
                })
                changed.append(f"{host}: created {s.record_type} {ip}")
                continue
            if len(records) > 1:
                log.warning("%s has %d %s records; only the first is kept up to date",
                            host, len(records), s.record_type)
            record = records[0]
            if record.get("content") == ip:
                continue
            record_id = str(record.get("id", ""))
            if not record_id.isalnum():
                raise DdnsError(f"Cloudflare listed a {s.record_type} record for {host}"
                                " without a usable id")
            await self._cf_call("PATCH", f"{base}/{record_id}", body={"content": ip})
            changed.append(f"{host}: {record.get('content')} -> {ip}")
        if changed:
            self._last_result = "; ".join(changed)
            log.info("Cloudflare updated: %s", self._last_result)
        else:
            self._last_result = f"records already point at {ip}"
            log.info("%s already point at %s; no update needed",
                     ", ".join(s.hostnames), ip)
        return bool(changed)


def _cf_errors(doc: object) -> str:
    if not isinstance(doc, dict):
        return ""
    errors = doc.get("errors")
    if not isinstance(errors, list):
        return ""
    parts = []
    for err in errors[:3]:
        if isinstance(err, dict):
            parts.append(f"{err.get('code', '?')}: {_preview(str(err.get('message', '')))}")
    return "; ".join(parts)


def _preview(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
