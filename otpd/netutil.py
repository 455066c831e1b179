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
