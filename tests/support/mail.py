"""The SMTP sink (aiosmtpd) the daemon mails to, and reading what it got.

Messages that carry a *tag* (``[[tag]]``, see :func:`tagged`) are noted with
the time their DATA arrived, so tests can tell lost, duplicated and late
messages apart.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

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


# --- a provider-like server: sessions counted, PIPELINING, scripted refusals, TLS ---------


class ProviderSink(SmtpSink):
    """A sink that behaves like a mail provider's submission server.

    ``pipelining``: offer PIPELINING in the EHLO reply (providers do; aiosmtpd
    alone does not). ``mail_replies``: answers to the next MAIL commands, in
    order, instead of 250 (e.g. ``"421 4.7.0 Try again later"``). ``drop_every``:
    close a session without answering the DATA of its Nth message; the message
    is kept (noted in ``received``), as when a connection dies after the server
    took the message and before the client heard so.
    """

    def __init__(self, *, pipelining: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipelining = pipelining
        self.mail_replies: list[str] = []
        self.drop_every: int | None = None
        self.mail_froms: list[str] = []  # every MAIL FROM, refused ones too
        self.dropped = 0

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself without this hook
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        with self._lock:
            self.mail_froms.append(address)
            scripted = self.mail_replies.pop(0) if self.mail_replies else None
        if scripted is not None:
            if scripted.startswith("421"):
                # 421: the server closes the session, once the reply is written.
                asyncio.get_running_loop().call_soon(server.transport.close)
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await super().handle_DATA(server, session, envelope)
        count = getattr(session, "otpd_messages", 0) + 1
        session.otpd_messages = count
        if self.drop_every and count % self.drop_every == 0:
            with self._lock:
                self.dropped += 1
            server.transport.close()
        return answer


class _CountingSMTP(SMTP):
    # aiosmtpd calls connection_made again for the TLS layer after STARTTLS:
    # one connection is counted once.
    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        counts = self.event_handler.sessions
        if not self._counted:
            self._counted = True
            with counts.lock:
                counts.opened += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        counts = self.event_handler.sessions
        if self._counted:
            self._counted = False
            with counts.lock:
                counts.closed += 1
        super().connection_lost(error)


class SessionCounts:
    """Connections the server accepted and saw closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.closed = 0

    @property
    def open(self) -> int:
        with self.lock:
            return self.opened - self.closed


class _CountingController(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


class ProviderServer(SmtpServer):
    """An aiosmtpd server for a :class:`ProviderSink` that counts sessions.

    ``starttls``/``implicit_tls``: a server SSL context (STARTTLS offered, or TLS
    from the first byte); ``logins``: user -> password, AUTH PLAIN/LOGIN offered
    (also without TLS); ``idle_timeout``: the server closes sessions idle that
    long (aiosmtpd answers "421 ... timeout" and closes).
    """

    def __init__(self, sink: ProviderSink, port: int, *,
                 starttls: ssl.SSLContext | None = None,
                 implicit_tls: ssl.SSLContext | None = None,
                 logins: dict[str, str] | None = None, idle_timeout: float = 300) -> None:
        super().__init__(sink, port)
        self.sink: ProviderSink = sink
        sink.sessions = SessionCounts()  # type: ignore[attr-defined]
        self.sessions: SessionCounts = sink.sessions  # type: ignore[attr-defined]
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.logins = logins
        self.idle_timeout = idle_timeout
        self.auth_failures = 0

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert self.logins is not None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode()
            if self.logins.get(user) == auth_data.password.decode():
                return AuthResult(success=True)
        self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    def start(self) -> None:
        kwargs: dict[str, Any] = {"timeout": self.idle_timeout}
        if self.starttls is not None:
            kwargs["tls_context"] = self.starttls
        if self.logins is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        self._controller = _CountingController(
            self.sink, hostname="127.0.0.1", port=self.port, ssl_context=self.implicit_tls,
            server_hostname="localhost", **kwargs)
        self._controller.start()
        # aiosmtpd connects once to itself at start: that session is not a client's.
        deadline = time.monotonic() + 5
        while self.sessions.open and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.sessions.lock:
            self.sessions.opened = self.sessions.closed = 0


def make_test_ca(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (the test CA a client
    is told to trust) and its key, made with openssl."""
    cert, key = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# --- a latency-injecting TCP proxy (benchmarks and round-trip tests) ----------------------


class LatencyProxy:
    """Forwards 127.0.0.1:``port`` to ``target`` and delays every chunk by ``delay``
    seconds in each direction (so a round trip costs 2 x ``delay``), keeping order.

    ``turns`` counts how often the client spoke after the server had: one per
    round trip the client waited for (a pipelined message costs 2, MAIL, RCPT,
    DATA and the message one at a time cost 4). ``connections`` counts sessions.
    Runs in the caller's event loop.
    """

    def __init__(self, target: int, delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = 0
        self.turns = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        state = {"server_spoke": True}  # the greeting comes first
        for src, dst, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.get_running_loop().create_task(
                self._pump(src, dst, upstream, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    upstream: bool, state: dict[str, bool]) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

        sender = loop.create_task(deliver())
        try:
            while True:
                data = await src.read(65536)
                if upstream and data and state["server_spoke"]:
                    self.turns += 1
                state["server_spoke"] = not upstream if data else state["server_spoke"]
                await queue.put((loop.time() + self.delay, data))
                if not data:
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
            dst.close()
