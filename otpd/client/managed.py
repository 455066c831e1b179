"""``manage_otp`` mode: the library makes, stores and checks OTPs itself.

What OTP-Publisher's ``manage_otp`` does, with the daemon's rules
(:mod:`otpd.otp`): codes from the OS CSPRNG; only
``HMAC-SHA256(key, salt || length-prefixed(reference, code, receiver,
param1..param4))`` is stored, with a random salt per OTP; the receiver is
bound in canonical form (``0812...`` = ``+62812...``); single use; at most
``max_attempts`` wrong codes, the last one burns it (1204); expired: 1203;
a reference already in the store: 1201. The clear code exists only in the
message text handed to the transport. The HMAC key is derived from
``secret_key``, so it is never the raw configured text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from otpd.client.config import ManageOtpSettings
from otpd.client.envelope import Params
from otpd.client.otpstore import OtpStore, StoredOtp
from otpd.client.response import OtpResponse
from otpd.msisdn import InvalidReceiver, canonical_receiver
from otpd.otp import derive_key, generate_code, new_salt, otp_digest, otp_matches
from otpd.otp_attempts import VERIFY_RESPONSES
from otpd.wire.codes import Code
from otpd.wire.protocol import (
    MAX_REFERENCE_CHARS,
    ProtocolError,
    check_template,
    render_template,
)


@dataclass(frozen=True)
class Issued:
    """A stored OTP whose message is still to be published."""

    reference: str
    salt: bytes
    text: str = ""  # the message with the clear code; only for the publish
    date_time: int = 0
    expiration: int = 0


class ManagedOtps:
    def __init__(self, config: ManageOtpSettings, store: OtpStore) -> None:
        self.config = config
        self.store = store
        self._key = derive_key(config.secret_key.encode("utf-8"), "client-otp")

    def _receiver(self, command: str, receiver: str) -> str:
        if not isinstance(receiver, str) or not receiver.strip():
            raise ProtocolError(Code.INVALID_REQUEST, "data.receiver: is required", command)
        try:
            return canonical_receiver(receiver, self.config.country_code)
        except InvalidReceiver as exc:
            raise ProtocolError(Code.INVALID_REQUEST, f"data.receiver: {exc}", command) from None

    @staticmethod
    def _reference(command: str, reference: str | int) -> str:
        text = str(reference).strip() if isinstance(reference, str | int) else ""
        if not text:
            raise ProtocolError(Code.INVALID_REQUEST, "data.reference: is required", command)
        if len(text) > MAX_REFERENCE_CHARS:
            raise ProtocolError(Code.INVALID_REQUEST, "data.reference: longer than"
                                f" {MAX_REFERENCE_CHARS} characters", command)
        return text

    async def issue(self, receiver: str, reference: str | int, lifetime: int,
                    message_format: str, params: Params) -> Issued | OtpResponse:
        """Make and store an OTP; the message to publish, or the refusal (1300, 1201)."""
        name = "request-otp"
        try:
            canonical = self._receiver(name, receiver)
            ref = self._reference(name, reference)
            check_template(message_format)
        except ProtocolError as exc:
            return OtpResponse.local_answer(name, exc.code, {}, exc.message)
        now = int(time.time())
        expiration = now + min(lifetime, self.config.max_lifetime)
        code = generate_code(self.config.length)
        salt = new_salt()
        digest = otp_digest(self._key, salt, ref, code, canonical, params)
        text = render_template(message_format, code)
        del code
        stored = StoredOtp(ref, salt, digest, float(expiration),
                           float(expiration + self.config.keep_expired))
        data = {"date_time": now, "receiver": receiver, "reference": ref}
        if not await self.store.insert(stored, float(now)):
            return OtpResponse.local_answer(name, Code.DUPLICATED, data, "reference already used")
        return Issued(ref, salt, text, now, expiration)

    async def forget(self, issued: Issued) -> None:
        """The message was not published: remove the OTP so the reference can be retried."""
        await self.store.discard(issued.reference, issued.salt)

    async def verify(self, receiver: str, otp: str | int, reference: str | int,
                     params: Params) -> OtpResponse:
        name = "verify-otp"
        now = time.time()
        data = {"date_time": int(now), "receiver": receiver, "reference": str(reference)}
        try:
            canonical = self._receiver(name, receiver)
            ref = self._reference(name, reference)
            code = str(otp).strip() if isinstance(otp, str | int) else ""
            if not code or len(code) > 32:
                raise ProtocolError(Code.INVALID_REQUEST, "data.otp: is required (at most 32"
                                                          " characters)", name)
        except ProtocolError as exc:
            return OtpResponse.local_answer(name, exc.code, data, exc.message)

        def matches(record: StoredOtp) -> bool:
            return otp_matches(self._key, record.salt, record.digest, ref, code,
                                      canonical, params)

        outcome = await self.store.verify(ref, now, matches, self.config.max_attempts)
        result, message = VERIFY_RESPONSES[outcome]
        return OtpResponse.local_answer(name, result, data, message)

    async def close(self) -> None:
        await self.store.close()
