"""Which frame on a reply topic is the daemon's answer (pure: no I/O).

Whoever may publish on a broker can put a frame on a client's reply topic
(the topic travels in the command, which they may read) before the daemon
answers: a forged ``{"response_code": "0000"}`` to a ``verify-otp`` with a
wrong code must not pass for the daemon's answer. So a broker transport hands
every frame on the reply topic to a :class:`ReplyCheck` and waits on past
those it refuses (:class:`UnacceptableReply`). A frame is the answer when:

* it is a JSON object with a ``response_code``;
* its ``command`` is the command as sent (``send-mail`` stays ``send-mail``)
  and its ``data`` echoes the request's ``receiver``, ``reference`` and
  ``id`` (those it carried) as the daemon echoes them: the parsed text,
  stripped, numbers as their decimal string;
* with a ``signing_key``: its signature verifies as a reply bound to the
  signature of the command sent (:func:`otpd.wire.signing.verify_reply`).
  Without a key the first two still drop answers to other commands and
  junk, but not a forger who copies the command's fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otpd.client.response import OtpResponse
from otpd.wire.protocol import ProtocolError, parse_request
from otpd.wire.signing import SIGNATURE_FIELD, SignatureError, verify_reply

# Request fields the daemon echoes in its answer's data (service._echo).
ECHOED = ("receiver", "reference", "id")


class UnacceptableReply(Exception):
    """Why a frame is not the answer: fixed text, never a code, value or secret."""


@dataclass(frozen=True)
class ReplyCheck:
    """Accepts the daemon's answer to one published command (see the module)."""

    command: str
    echo: Mapping[str, str]
    request_signature: str = ""
    key: str = field(default="", repr=False)

    @classmethod
    def for_request(cls, body: bytes, key: str = "") -> ReplyCheck:
        """The check for the answer to ``body`` (the bytes published), read
        with the daemon's own parser so that the echo is what it will echo."""
        try:
            env = parse_request(body)
        except ProtocolError as exc:
            raise ValueError(f"not a command the daemon would answer: {exc.message}") from None
        echo = {name: value for name in ECHOED
                if isinstance(value := getattr(env.command, name, None), str) and value}
        signature = env.raw.get(SIGNATURE_FIELD) if key else ""
        if not isinstance(signature, str) or (key and not signature):
            raise ValueError("a signing key is set but the command is not signed")
        return cls(env.name, echo, signature, key)

    def __call__(self, frame: bytes) -> OtpResponse:
        """The answer in ``frame``; :class:`UnacceptableReply` if it is not one."""
        try:
            obj: Any = json.loads(frame)
        except (ValueError, RecursionError):
            raise UnacceptableReply("not JSON") from None
        if not isinstance(obj, dict):
            raise UnacceptableReply("not a JSON object")
        try:
            response = OtpResponse.from_object(obj, self.command)
        except ValueError as exc:
            raise UnacceptableReply(str(exc)) from None
        if obj.get("command") != self.command:
            raise UnacceptableReply("answers another command")
        data = obj.get("data")
        echoed: dict[str, Any] = data if isinstance(data, dict) else {}
        for name, value in self.echo.items():
            if name not in echoed:
                raise UnacceptableReply(f"data.{name}: missing")
            if echoed[name] != value:
                raise UnacceptableReply(f"data.{name}: not the request's")
        if self.key:
            try:
                verify_reply(obj, self.request_signature, self.key)
            except SignatureError as exc:
                raise UnacceptableReply(str(exc)) from None
        return response
