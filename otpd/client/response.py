"""The typed result of every client operation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from otpd.client.errors import TransportError
from otpd.wire.codes import Code

_ACCEPTED = (Code.SUCCESS.value, Code.PENDING.value)


@dataclass(frozen=True)
class OtpResponse:
    """An answer of the daemon, or one made by the library (``local = True``).

    ``response_code`` is the wire's string (``"0000"``, ``"1202"``...);
    ``data`` the answer's ``data`` object; ``message`` a reason on failure.
    """

    command: str
    response_code: str
    data: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    local: bool = False  # made by this library (fire-and-forget, manage_otp), not the daemon

    @property
    def code(self) -> Code | None:
        """The code as :class:`otpd.wire.codes.Code`, or None for a code otpd does not know."""
        try:
            return Code(self.response_code)
        except ValueError:
            return None

    @property
    def ok(self) -> bool:
        """0000 (done) or 1111 (accepted: published, or queued and sent before
        its expiration or dropped). Every other code is a refusal or failure."""
        return self.response_code in _ACCEPTED

    @property
    def success(self) -> bool:
        """0000 only: handed to the modem / SMTP server, OTP valid, list updated."""
        return self.response_code == Code.SUCCESS.value

    @property
    def pending(self) -> bool:
        return self.response_code == Code.PENDING.value

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "command": self.command,
            "response_code": self.response_code,
            "data": self.data,
        }
        if self.message:
            body["message"] = self.message
        return body

    @classmethod
    def local_answer(cls, command: str, code: Code, data: dict[str, Any],
                     message: str | None = None) -> OtpResponse:
        return cls(command, code.value, data, message, local=True)

    @classmethod
    def from_wire(cls, raw: bytes | str, command: str) -> OtpResponse:
        """Parse an answer; OTP-Pi's spellings (``response-code``, ``error``) are read too."""
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise TransportError(f"{command}: the answer is not JSON") from None
        if not isinstance(obj, dict):
            raise TransportError(f"{command}: the answer is not a JSON object")
        try:
            return cls.from_object(obj, command)
        except ValueError as exc:
            raise TransportError(f"{command}: the answer has {exc}") from None

    @classmethod
    def from_object(cls, obj: dict[str, Any], command: str) -> OtpResponse:
        """An answer's parsed JSON object; ValueError without a response code."""
        code = obj.get("response_code", obj.get("response-code"))
        if isinstance(code, int) and not isinstance(code, bool):
            code = f"{code:04d}"
        if not isinstance(code, str) or not code:
            raise ValueError("no response_code")
        data = obj.get("data")
        message = obj.get("message") or obj.get("error") or obj.get("error_message")
        name = obj.get("command")
        return cls(
            command=name if isinstance(name, str) and name else command,
            response_code=code,
            data=data if isinstance(data, dict) else {},
            message=message if isinstance(message, str) else None,
        )
