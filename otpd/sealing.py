"""Authenticated encryption of outbox text at rest.

A pending message may hold a clear OTP until it is handed to a modem or SMTP
server. It is kept sealed with AES-GCM under a key derived from the server key
(which lives outside the database), and wiped once the message is final.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otpd.otp import derive_key

_NONCE_BYTES = 12


class SealError(Exception):
    pass


class Sealer:
    def __init__(self, server_key: bytes) -> None:
        self._aead = AESGCM(derive_key(server_key, "outbox-seal/v1"))

    def seal(self, text: str, row_tag: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, text.encode("utf-8"), row_tag.encode())

    def open(self, blob: bytes, row_tag: str) -> str:
        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], row_tag.encode())
        except (InvalidTag, ValueError) as exc:
            raise SealError("outbox text cannot be decrypted (wrong otp.key_file?)") from exc
        return plain.decode("utf-8")
