"""Authenticated encryption of outbox text at rest, and between nodes.

A pending message may hold a clear OTP until it is handed to a modem or SMTP
server. It is kept sealed with AES-GCM under a key derived from the server key
(which lives outside the database), and wiped once the message is final.

A message one node hands back to the shared queue (``otpd.delivery.handover``)
crosses the broker sealed the same way under a key of its own purpose, which
every node derives from the shared ``otp.key_file``: a broker account can
neither read the OTP in it nor forge one (the tag covers the receiver, the
expiration and the id too).
"""

from __future__ import annotations

import base64
import binascii
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
        self._handover = AESGCM(derive_key(server_key, "handover/v1"))

    def seal(self, text: str, row_tag: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, text.encode("utf-8"), row_tag.encode())

    def open(self, blob: bytes, row_tag: str) -> str:
        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], row_tag.encode())
        except (InvalidTag, ValueError) as exc:
            raise SealError("outbox text cannot be decrypted (wrong otp.key_file?)") from exc
        return plain.decode("utf-8")

    def seal_handover(self, text: str, context: str) -> str:
        """``text`` for another node (base64), bound to ``context``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        blob = nonce + self._handover.encrypt(nonce, text.encode("utf-8"), context.encode())
        return base64.b64encode(blob).decode("ascii")

    def open_handover(self, sealed: str, context: str) -> str:
        try:
            blob = base64.b64decode(sealed, validate=True)
            plain = self._handover.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                           context.encode())
            return plain.decode("utf-8")
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise SealError("a handed-over message cannot be opened (another otp.key_file,"
                            " or altered)") from exc
