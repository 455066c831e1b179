"""``[ddns]``: keep a DNS name pointed at the Pi's public IP address.

Keys (all validated; errors name the key):

``enabled`` (true), ``provider``: ``noip``, ``dynu``, ``dyndns``, ``freedns``
(dyndns2 protocol with the provider's update server preset), ``dyndns2`` (any
other dyndns2 provider: give ``server``) or ``cloudflare`` (API v4);
``hostnames`` (the names to keep updated), ``record_type`` (``A`` or
``AAAA``), ``ip_url`` (a URL answering the public IP as plain text; use an
IPv6-only one for AAAA), ``interval`` (s between checks, 300), ``timeout``
(s per request, 20), ``retry_min``/``retry_max`` (backoff after provider
errors, 60 / 3600 s), ``user_agent``.

dyndns2: ``server`` (base URL; ``/nic/update`` is appended), ``username``,
``password`` (a secret: inline, ``password_file`` or ``password_env``),
``check_dns`` (true: at start, no update when DNS already answers the IP).

cloudflare: ``zone_id`` (32 hex digits, on the zone's overview page),
``api_token`` (a secret; an API token with Zone.DNS Edit on that zone),
``api_url``, ``ttl`` (1 = automatic, else 30..86400), ``proxied`` (false).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from otpd import __version__
from otpd.settings_reader import Section

DYNDNS2_SERVERS = {
    "noip": "https://dynupdate.no-ip.com",
    "dynu": "https://api.dynu.com",
    "dyndns": "https://members.dyndns.org",
    "freedns": "https://freedns.afraid.org",
}
PROVIDERS = (*DYNDNS2_SERVERS, "dyndns2", "cloudflare")
DEFAULT_IP_URL = "https://api.ipify.org"
DEFAULT_CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
DEFAULT_USER_AGENT = f"otpd/{__version__} (SMS OTP gateway)"

_DYNDNS2_KEYS = ("server", "username", "password", "password_file", "password_env", "check_dns")
_CLOUDFLARE_KEYS = ("zone_id", "api_token", "api_token_file", "api_token_env", "api_url", "ttl",
                    "proxied")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_ZONE_ID = re.compile(r"[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class DdnsSettings:
    provider: str  # one of PROVIDERS
    hostnames: tuple[str, ...]
    enabled: bool = True
    record_type: str = "A"  # A | AAAA
    ip_url: str = DEFAULT_IP_URL
    interval: float = 300.0
    timeout: float = 20.0
    retry_min: float = 60.0
    retry_max: float = 3600.0
    user_agent: str = DEFAULT_USER_AGENT
    # dyndns2
    server: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    check_dns: bool = True
    # cloudflare
    zone_id: str = ""
    api_token: str = field(default="", repr=False)
    api_url: str = DEFAULT_CLOUDFLARE_API
    ttl: int = 1
    proxied: bool = False
    # The dyndns2 specification asks clients to wait this long after "911"
    # or "dnserr" (the provider's own trouble); not a configuration key.
    provider_down_delay: float = 1800.0

    @property
    def protocol(self) -> str:
        """``dyndns2`` or ``cloudflare``."""
        return "cloudflare" if self.provider == "cloudflare" else "dyndns2"


def valid_hostname(name: str) -> bool:
    """A fully qualified DNS name: at least two labels of letters, digits and
    hyphens, 253 characters at most; a trailing dot is allowed."""
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii() or len(name) > 253:
        return False
    labels = name.split(".")
    return len(labels) >= 2 and all(_LABEL.match(label) for label in labels)


def _url(s: Section, key: str, default: str) -> str:
    value = s.str(key, default)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        s.error(key, "must be an http:// or https:// URL")
        return default
    if parts.username or parts.password:
        s.error(key, "must not carry credentials (use username/password or api_token)")
        return default
    return value.rstrip("/")


def parse_ddns_settings(section: Section | None) -> DdnsSettings | None:
    """None when there is no ``[ddns]`` table. Errors are appended to the
    section's shared error list (the caller raises ConfigError)."""
    if section is None:
        return None
    s = section
    enabled = s.bool("enabled", True)
    provider = s.str("provider", "", choices=PROVIDERS, required=True)
    hostnames = tuple(s.str_list("hostnames"))
    if not s.has("hostnames") or not hostnames:
        s.error("hostnames", 'is required: the names to keep updated, e.g. ["otp.example.com"]')
    for name in hostnames:
        if not valid_hostname(name):
            s.error("hostnames", f"{name!r} is not a fully qualified host name")
    if len(set(hostnames)) != len(hostnames):
        s.error("hostnames", "lists a name twice")
    record_type = s.str("record_type", "A", choices=("A", "AAAA"))
    interval = s.float("interval", 300.0, min=30.0, max=86400.0)
    timeout = s.float("timeout", 20.0, min=1.0, max=300.0)
    retry_min = s.float("retry_min", 60.0, min=5.0, max=86400.0)
    retry_max = s.float("retry_max", 3600.0, min=5.0, max=7 * 86400.0)
    if retry_max < retry_min:
        s.error("retry_max", "must be >= ddns.retry_min")
    user_agent = s.str("user_agent", DEFAULT_USER_AGENT)
    if not user_agent.strip() or not user_agent.isprintable():
        s.error("user_agent", "must be a printable, non-empty string")
        user_agent = DEFAULT_USER_AGENT
    ip_url = _url(s, "ip_url", DEFAULT_IP_URL)

    is_cloudflare = provider == "cloudflare"
    unused = _DYNDNS2_KEYS if is_cloudflare else _CLOUDFLARE_KEYS
    for key in unused:
        if s.has(key) and provider:
            s.error(key, f"is not used with provider = {provider!r}")

    settings = DdnsSettings(
        provider=provider,
        hostnames=tuple(h.rstrip(".").lower() for h in hostnames),
        enabled=enabled,
        record_type=record_type,
        ip_url=ip_url,
        interval=interval,
        timeout=timeout,
        retry_min=retry_min,
        retry_max=max(retry_max, retry_min),
        user_agent=user_agent,
    )
    if not provider:
        return settings  # already reported; its keys cannot be judged without it
    settings = _cloudflare(s, settings) if is_cloudflare else _dyndns2(s, settings)
    s.finish()
    return settings


def _dyndns2(s: Section, base: DdnsSettings) -> DdnsSettings:
    preset = DYNDNS2_SERVERS.get(base.provider, "")
    if base.provider == "dyndns2" and not s.has("server"):
        s.error("server", 'is required with provider = "dyndns2", e.g. "https://dyn.example.net"')
    server = _url(s, "server", preset) if s.has("server") else preset
    username = s.str("username", "", required=True)
    password = s.secret("password")
    if not password and not any(s.has(k) for k in ("password", "password_file", "password_env")):
        s.error("password", "is required (or password_file / password_env)")
    return replace(base, server=server, username=username, password=password,
                   check_dns=s.bool("check_dns", True))


def _cloudflare(s: Section, base: DdnsSettings) -> DdnsSettings:
    zone_id = s.str("zone_id", "", required=True)
    if zone_id and not _ZONE_ID.match(zone_id):
        s.error("zone_id", "must be the zone's 32 hex digit ID (on the zone's overview page)")
    token = s.secret("api_token")
    if not token and not any(s.has(k) for k in ("api_token", "api_token_file", "api_token_env")):
        s.error("api_token", "is required (or api_token_file / api_token_env): an API token"
                             " with Zone.DNS Edit permission on the zone")
    ttl = s.int("ttl", 1, min=1, max=86400)
    if 1 < ttl < 30:
        s.error("ttl", "must be 1 (automatic) or 30..86400")
        ttl = 1
    return replace(base, zone_id=zone_id, api_token=token,
                   api_url=_url(s, "api_url", DEFAULT_CLOUDFLARE_API), ttl=ttl,
                   proxied=s.bool("proxied", False))
