"""The SMTP sink (aiosmtpd) the daemon mails to, and reading what it got.

Messages that carry a *tag* (``[[tag]]``, see :func:`tagged`) are noted with
the time their DATA arrived, so tests can tell lost, duplicated and late
messages apart.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller

_TAG = re.compile(r"\[\[([A-Za-z0-9_.:-]+)\]\]")
_CODE = re.compile(r"\b(\d{6})\b")


def tagged(tag: str, text: str = "fault test") -> str:
    """Message text carrying ``tag``, which the receivers pick out again."""
    return f"{text} [[{tag}]]"


def tag_of(text: str) -> str | None:
    match = _TAG.search(text)
    return match.group(1) if match else None


def body_text(message: Message) -> str:
    payload = message.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", "replace")
    parts = message.get_payload()
    if isinstance(parts, list):
        return "\n".join(body_text(p) for p in parts if isinstance(p, Message))
    return str(parts)


def code_in(text: str) -> str:
    """The six-digit code in a message text (fails the test if there is none)."""
    match = _CODE.search(text)
    assert match, f"no code in the message: {text!r}"
    return match.group(1)


def otp_in(message: Message) -> str:
    return code_in(body_text(message))


@dataclass(frozen=True)
class Receipt:
    tag: str
    at: float  # when the receiver had the whole message (the receiver's clock)


class SmtpSink:
    """aiosmtpd handler keeping every message, and each one's tag and arrival time.

    ``reject_with``: the answer to every RCPT instead of 250. The receipt is noted
    *before* the optional ``delay`` and the 250 answer: a kill during the delay
    leaves a message the server has but the daemon never heard accepted, as a
    kill inside a real SMTP conversation does.

    ``rcpts`` holds every ``RCPT TO`` address the server was offered (refused
    ones too) and ``envelopes`` the (``MAIL FROM``, ``RCPT TO`` list) of each
    message: what the server delivers to, whatever the headers say.
    """

    def __init__(self, delay: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.delay = delay
        self.clock = clock
        self.reject_with: str | None = None
        self.received: list[Receipt] = []
        self.messages: list[Message] = []
        self.rcpts: list[str] = []
        self.envelopes: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        with self._lock:
            self.rcpts.append(address)
        if self.reject_with:
            return self.reject_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = self.clock()
        message = message_from_bytes(envelope.content)
        with self._lock:
            self.received.append(Receipt(tag_of(body_text(message)) or "?", at))
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, tuple(envelope.rcpt_tos)))
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 Message accepted"

    def tags(self) -> list[str]:
        with self._lock:
            return [r.tag for r in self.received]

    def to(self, address: str) -> list[Message]:
        """The messages addressed to ``address``."""
        with self._lock:
            return [m for m in self.messages if address in str(m.get("To", ""))]


class SmtpServer:
    """An aiosmtpd server for ``sink`` on a fixed port, to stop and start again."""

    def __init__(self, sink: SmtpSink, port: int) -> None:
        self.sink = sink
        self.port = port
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None
