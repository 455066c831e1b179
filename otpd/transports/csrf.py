"""CSRF tokens and same-origin checks for the status page's forms (pure: no I/O).

A browser sends Basic credentials to otpd on its own, also when another site's
page submits a form to it: a state-changing POST must therefore carry a token
that only a page served to that user could contain, and come from otpd's own
origin.

A token is ``<window>.<mac>``: HMAC-SHA256, under a key derived from the
daemon's server key, of the user name and a time window (``WINDOW`` s). It is
accepted in its own window and the next one, so a page loaded just before a
window ends still works; it needs no state on the server and is checked in
constant time. The key derivation is domain-separated, so the MAC can never be
mistaken for an OTP hash or a signature made under the same key.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

WINDOW = 3600  # s of one token window; a token lives one to two windows
_KEY_LABEL = b"otpd status-page csrf v1"


def derive_key(server_key: bytes) -> bytes:
    """The CSRF key: never the server key itself."""
    return hmac.new(server_key, _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, user: str, window: int) -> str:
    # NUL separates fields: user names come from htpasswd and contain no NUL.
    message = f"{user}\0{window}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def make_token(key: bytes, user: str, now: float) -> str:
    window = int(now // WINDOW)
    return f"{window}.{_mac(key, user, window)}"


def token_valid(key: bytes, user: str, token: str, now: float) -> bool:
    """True when ``token`` was made for ``user`` in this window or the previous one."""
    window_text, dot, mac = token.partition(".")
    if not dot or not window_text.isascii() or not window_text.isdigit() or len(window_text) > 12:
        return False
    window = int(window_text)
    current = int(now // WINDOW)
    if window not in (current, current - 1):
        return False
    # Both sides are ASCII hex of one length when genuine; compare_digest takes str.
    return mac.isascii() and hmac.compare_digest(mac, _mac(key, user, window))


def same_origin(origin: str | None, referer: str | None, host: str, tls: bool) -> bool:
    """Did the browser say the request comes from a page of this server?

    ``Origin`` decides when present (``null`` from a sandboxed or privacy-bound
    page is refused); otherwise ``Referer``; neither: refused. ``host`` is the
    Host header the browser used. Behind a TLS-terminating proxy (``tls``
    False) the page's scheme may be https; on a TLS listener only https counts.
    """
    source = origin if origin is not None else referer
    if not source:
        return False
    try:
        parts = urlsplit(source.strip())
    except ValueError:
        return False
    schemes = ("https",) if tls else ("http", "https")
    if parts.scheme not in schemes or not parts.netloc or not host:
        return False
    return parts.netloc.lower() == host.strip().lower()
