"""HTTP Basic credentials as real clients send them.

Standard clients send ``Basic base64(user:password)``. The PHP OTP-Publisher
WebSocket client sends ``Basic user:user`` without base64 (and with the user
name as the password). The two forms cannot be confused: ``:`` is not a
base64 character, so a value containing ``:`` is never valid base64.
"""

from __future__ import annotations

import base64
import binascii


def parse_basic_auth(header: str | None, *, raw_form: bool = True,
                     latin1: bool = False) -> tuple[str, str] | None:
    """``(user, password)`` from an Authorization header value, or None.

    The password is everything after the first ``:`` (it may contain ``:``).
    ``raw_form``: also accept the un-encoded ``Basic user:password`` of the PHP
    WebSocket client (the broker does; the REST API, which no such client
    uses, does not). ``latin1``: credentials that are not UTF-8 are read as
    latin-1 (the REST API: they then fail the password check, with the usual
    answer) instead of being refused here.
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    value = value.strip()
    if not value:
        return None
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        if not raw_form:
            return None
        # Header values reach us latin-1 decoded; recover the raw bytes.
        try:
            decoded = value.encode("latin-1")
        except UnicodeEncodeError:
            return None
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        if not latin1:
            return None
        text = decoded.decode("latin-1")
    user, sep, password = text.partition(":")
    if not sep or not user:
        return None
    return user, password
