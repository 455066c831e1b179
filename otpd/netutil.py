"""Small network helpers shared by the daemon's consumers and the publisher library.

Kept apart from both so the client never imports a daemon module to get them;
this module imports nothing from otpd.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
from urllib.parse import urlsplit, urlunsplit


def tls_context(ca_file: str) -> ssl.SSLContext:
    """Verify the server (hostname included) against ``ca_file`` or the system store."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def safe_url(url: str) -> str:
    """The URL without user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_password(url: str) -> str:
    """The password in ``url`` ("" if none or the URL does not parse), to redact it."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP Basic (UTF-8, the form every
    server here parses; the PHP client's raw form is not sent by otpd)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def is_loopback(host: str) -> bool:
    """True for an address that never leaves the machine: a loopback name or IP,
    or a Unix socket (no host, or a path)."""
    if host in ("localhost", "") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_group(address: str) -> str:
    """The key an address is limited under: IPv4 as is, IPv6 as its /64 network,
    IPv4-mapped IPv6 as the IPv4 address; anything else (a Unix socket, "-") as
    given. A client rotating within its /64 stays one group."""
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # a zone index (fe80::1%eth0) names no other host
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
