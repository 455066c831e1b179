"""OTP codes: generation, keyed hashing and verification (pure, apart from the key file).

Stored: HMAC-SHA256(server_key, salt || len-prefixed(reference, code,
receiver, param1..param4)). The clear code is never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

KEY_BYTES = 32
SALT_BYTES = 16


class KeyFileError(Exception):
    pass


def generate_code(length: int) -> str:
    """A uniformly random numeric code from the OS CSPRNG."""
    return f"{secrets.randbelow(10**length):0{length}d}"


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def _length_prefixed(parts: Sequence[str]) -> bytes:
    # A length prefix per field: ("ab","c") and ("a","bc") must hash differently.
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def otp_digest(
    key: bytes, salt: bytes, reference: str, code: str, receiver: str, params: Sequence[str]
) -> bytes:
    message = salt + _length_prefixed([reference, code, receiver, *params])
    return hmac.new(key, message, hashlib.sha256).digest()


def otp_matches(
    key: bytes,
    salt: bytes,
    stored: bytes,
    reference: str,
    code: str,
    receiver: str,
    params: Sequence[str],
) -> bool:
    candidate = otp_digest(key, salt, reference, code, receiver, params)
    return hmac.compare_digest(candidate, stored)


def derive_key(key: bytes, purpose: str) -> bytes:
    """Independent sub-keys from the one server key (e.g. for sealing the outbox)."""
    return hmac.new(key, b"otpd/" + purpose.encode(), hashlib.sha256).digest()


def load_or_create_key(path: Path) -> bytes:
    """The server key: created 0600 on first start, refused if others can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _publish_new_key(path)
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"otp.key_file: {path} must not be readable by group or others (chmod 600)"
        )
    data = path.read_bytes()
    if len(data) != KEY_BYTES:
        raise KeyFileError(f"otp.key_file: {path} must hold exactly {KEY_BYTES} bytes")
    return data


def _publish_new_key(path: Path) -> None:
    """Write a fresh key beside ``path``, then link it into place: whoever starts
    at the same moment (two nodes sharing the file) sees no file or a whole
    key, never a half-written one, and only the first link wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process published its key first: use that one
        else:
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
