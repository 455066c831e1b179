"""SMTP sessions kept open per account and reused, over aiosmtplib's ``SMTP``.

An :class:`AccountPool` holds up to ``max_sessions`` authenticated sessions of
one ``[[smtp]]`` account: the connection, TLS, EHLO and AUTH (aiosmtplib's
``SMTP.connect``) are paid once per session, not once per message. A session
sends up to ``max_messages_per_session`` messages (each a MAIL, RCPT, DATA
transaction; RSET before the next), is retired after ``max_session_age`` and
closed after ``idle_timeout`` unused. Idle sessions are reused last-in first
out, so that the coldest idle out instead of all staying half-warm.

PIPELINING (RFC 2920): aiosmtplib 5 writes one command and reads one reply at
a time (its protocol drops a reply that arrives while none is awaited), so a
server that offers PIPELINING gets RSET, MAIL, RCPT and DATA in one write from
:class:`_ReplyReader`, which stands in for aiosmtplib's protocol on the same
transport (``transport.set_protocol``, public asyncio API) for the length of
one transaction and hands it back after: one round trip for the envelope, one
for the message, instead of four or five.

A message counts as handed off only once the server accepted its DATA. A
session found dead (closed while idle, dropped mid-stream) is replaced by a
fresh one and the message sent on it once more: nothing is lost, and the only
message that can go twice is the one whose final reply was lost with the
connection (the server may have taken it; RFC 5321 §4.1.1.4 allows no better).

What a refusal means (rest the account, defer the message, refuse it for
good) is decided by the pure rules in :mod:`otpd.channels.smtp_rules`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiosmtplib

from otpd.channels import smtp_rules as rules
from otpd.channels.email_settings import SmtpAccount
from otpd.netutil import tls_context

log = logging.getLogger("otpd.channels.smtp")

_DOT = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 §4.5.2)
_MAX_REPLY = 64 * 1024  # bytes of replies buffered at most (a hostile server)
_QUIT_BOUND = 2.0  # s a QUIT may take before the connection is just closed
_STOP_QUIT = 0.5  # s the QUITs may take when otpd stops


class Reply(NamedTuple):
    code: int
    message: str


class SendError(Exception):
    """A message did not get through on one account; ``verdict`` says what that means."""

    def __init__(self, verdict: rules.Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class _Refusal(Exception):
    """The server answered, but not what the transaction needed."""

    def __init__(self, stage: str, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.stage, self.code, self.message = stage, code, message


class _Lost(Exception):
    """The session died (closed, reset, timed out, garbled)."""


class _ReplyReader(asyncio.Protocol):
    """Reads every SMTP reply that arrives, in order, however the bytes are split."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replies: collections.deque[Reply] = collections.deque()
        self._lines: list[str] = []
        self._code = 0
        self._waiter: asyncio.Future[None] | None = None
        self.error: str = ""  # set once the connection is unusable

    def data_received(self, data: bytes) -> None:
        if self.error:
            return
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[:end + 1]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(f"malformed reply line {line[:80]!r}")
                return
            code = int(line[:3])
            if self._lines and code != self._code:
                self._fail("reply code changed inside a multi-line reply")
                return
            self._code = code
            self._lines.append(line[4:].decode("utf-8", "replace").strip())
            if line[3:4] != b"-":
                self._replies.append(Reply(code, "\n".join(self._lines)))
                self._lines = []
        if len(self._buffer) > _MAX_REPLY:
            self._fail("reply too long")
        self._wake()

    def eof_received(self) -> bool:
        self._fail("the server closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection lost")

    def _fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, count: int, timeout: float) -> list[Reply]:
        """The next ``count`` replies (_Lost if the connection dies first)."""
        try:
            async with asyncio.timeout(timeout):
                while len(self._replies) < count:
                    if self.error:
                        raise _Lost(self.error)
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
        except TimeoutError:
            self._fail("timed out waiting for the server's reply")
            raise _Lost(self.error) from None
        return [self._replies.popleft() for _ in range(count)]


def _envelope_address(address: str) -> bytes:
    data = address.encode("ascii")  # validated mailboxes: ASCII, no spaces or controls
    if any(b <= 0x20 or b == 0x7F or b in b"<>" for b in data):
        raise ValueError(f"not an envelope address: {address!r}")
    return b"<" + data + b">"


class Session:
    """One authenticated SMTP session (aiosmtplib ``SMTP``), used by one sender at a time."""

    def __init__(self, smtp: aiosmtplib.SMTP, pipelining: bool, now: float) -> None:
        self.smtp = smtp
        self.pipelining = pipelining
        self.opened_at = now
        self.last_used = now
        self.messages = 0
        self.clean = True  # no half-done transaction left on the server

    @property
    def alive(self) -> bool:
        """False once the server closed it (noticed without a round trip)."""
        return self.smtp.is_connected

    async def send(self, sender: str, recipient: str, content: bytes, timeout: float) -> str:
        """One transaction; the server's final reply text. _Refusal or _Lost."""
        if not self.alive:
            raise _Lost("closed while idle")
        if self.pipelining:
            return await self._send_pipelined(sender, recipient, content, timeout)
        return await self._send_stepwise(sender, recipient, content, timeout)

    async def _send_stepwise(self, sender: str, recipient: str, content: bytes,
                             timeout: float) -> str:
        smtp = self.smtp
        try:
            if not self.clean:
                await smtp.rset(timeout=timeout)
            self.clean = False
            errors, message = await smtp.sendmail(sender, [recipient], content, timeout=timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise _Refusal(rules.RCPT, first.code, first.message) from exc
        except aiosmtplib.SMTPSenderRefused as exc:
            raise _Refusal(rules.MAIL, exc.code, exc.message) from exc
        except aiosmtplib.SMTPDataError as exc:
            raise _Refusal(rules.DATA, exc.code, exc.message) from exc
        except aiosmtplib.SMTPResponseException as exc:  # RSET refused, a garbled reply
            raise _Refusal(rules.MAIL, exc.code, exc.message) from exc
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
                TimeoutError) as exc:
            raise _Lost(_describe(exc)) from exc
        if errors:  # a refused recipient among several (there is only ever one)
            code, text = next(iter(errors.values()))
            raise _Refusal(rules.RCPT, code, text)
        self.clean = True
        return message

    async def _send_pipelined(self, sender: str, recipient: str, content: bytes,
                              timeout: float) -> str:
        smtp = self.smtp
        transport, own = smtp.transport, smtp.protocol
        if not isinstance(transport, asyncio.WriteTransport) or own is None:
            raise _Lost("closed while idle")
        payload = _DOT.sub(b"..", content if content.endswith(b"\r\n") else content + b"\r\n")
        commands: list[bytes] = []
        stages: list[tuple[str, tuple[int, ...]]] = []
        if self.messages or not self.clean:  # RSET between transactions: free when pipelined
            commands.append(b"RSET")
            stages.append((rules.MAIL, (250,)))
        mail = b"MAIL FROM:" + _envelope_address(sender)
        if smtp.supports_extension("size"):
            mail += b" SIZE=%d" % len(payload)
        commands += [mail, b"RCPT TO:" + _envelope_address(recipient), b"DATA"]
        stages += [(rules.MAIL, (250,)), (rules.RCPT, (250, 251)), (rules.DATA, (354,))]
        reader = _ReplyReader()
        transport.set_protocol(reader)
        try:
            transport.write(b"\r\n".join(commands) + b"\r\n")
            self.clean = False
            # Replies one by one: a server that refuses and closes (421) has its
            # say even when the connection is gone before the last reply.
            refusal: _Refusal | None = None
            for stage, ok in stages:
                try:
                    (last,) = await reader.read(1, timeout)
                except _Lost:
                    if refusal is not None:
                        raise refusal from None
                    raise
                if refusal is None and last.code not in ok:
                    refusal = _Refusal(stage, last.code, last.message)
            if last.code == 354:
                # The server took DATA: finish it, with an empty message if an
                # earlier command failed (it must refuse that one: no recipient).
                transport.write(b".\r\n" if refusal is not None else payload + b".\r\n")
                (final,) = await reader.read(1, timeout)
                if refusal is None and final.code != 250:
                    refusal = _Refusal(rules.DATA, final.code, final.message)
            if refusal is not None:
                raise refusal
            self.clean = True
            return final.message
        finally:
            if reader.error or transport.is_closing():
                smtp.close()
            else:
                transport.set_protocol(own)  # aiosmtplib's again, for RSET, QUIT, NOOP

    async def quit(self) -> None:
        """Say goodbye politely, within a bound; close in any case."""
        try:
            async with asyncio.timeout(_QUIT_BOUND):
                await self.smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.smtp.close()

    def close(self) -> None:
        self.smtp.close()


@dataclass
class Lease:
    """The right to use one session of ``pool`` (``session`` None: open one)."""

    pool: AccountPool
    session: Session | None


class AccountPool:
    """The sessions of one ``[[smtp]]`` account, its rests and its counts."""

    def __init__(self, account: SmtpAccount, helo_name: str | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.account = account
        self.name = account.name
        self.helo_name = account.helo_name or helo_name
        self.on_change = on_change  # a session came back or a rest changed
        self.clock = clock
        self._idle: list[Session] = []
        self._leased = 0  # sessions in use or being opened
        self._closing: set[asyncio.Task[None]] = set()
        self._tls: ssl.SSLContext | None = None
        self.rest_until = 0.0  # monotonic
        self.rest_reason = ""
        self.rests = 0  # how many times it was put to rest
        self.failures_in_row = 0  # unreachable in a row (the rest doubles)
        self.last_error = ""
        self.pipelining: bool | None = None  # as the server last offered it
        self.sent = 0
        self.connections = 0  # sessions opened since start
        self.reconnects = 0  # sessions found dead and replaced while sending
        self.sent_day: int | None = None  # every node, last 24 h (store), when capped
        self.sent_day_local = 0  # this node's sends since sent_day was read

    # -- capacity ------------------------------------------------------------
    def resting(self, now: float) -> bool:
        return now < self.rest_until

    def rest_left(self, now: float) -> float:
        return max(self.rest_until - now, 0.0)

    @property
    def busy(self) -> int:
        return self._leased

    @property
    def open_sessions(self) -> int:
        return self._leased + len(self._idle)

    def has_room(self, now: float) -> bool:
        """A sender could start on this account now."""
        return not self.resting(now) and (bool(self._idle)
                                          or self._leased < self.account.max_sessions)

    def rest(self, seconds: float, reason: str) -> None:
        """No new message on this account for ``seconds``; idle sessions closed."""
        now = self.clock()
        self.rest_until = max(self.rest_until, now + seconds)
        self.rest_reason = reason
        self.last_error = reason
        self.rests += 1
        log.warning("smtp account %s: resting %.0f s: %s", self.name, seconds, reason)
        for session in self._idle:
            self._retire(session)
        self._idle.clear()
        self.on_change()

    def lease(self, now: float) -> Lease | None:
        """An idle session (the most recently used), or the right to open one."""
        if self.resting(now):
            return None
        if self._idle:
            self._leased += 1
            return Lease(self, self._idle.pop())
        if self._leased < self.account.max_sessions:
            self._leased += 1
            return Lease(self, None)
        return None

    def give_back(self, lease: Lease) -> None:
        self._leased -= 1
        session, lease.session = lease.session, None
        if session is not None:
            now = self.clock()
            session.last_used = now
            if (session.alive and not self.resting(now)
                    and rules.reusable(session.messages, session.opened_at, now,
                                       self.account.reuse)):
                self._idle.append(session)
            else:
                self._retire(session)
        self.on_change()

    # -- sending ---------------------------------------------------------------
    async def transmit(self, lease: Lease, sender: str, recipient: str, content: bytes) -> str:
        """Send one message on the lease's session (opened if need be); the server's
        final reply. SendError says what a failure means; the caller rests the account."""
        account = self.account
        retried = False
        while True:
            fresh = lease.session is None
            if lease.session is None:
                lease.session = await self._open()
            session = lease.session
            try:
                reply = await session.send(sender, recipient, content, account.timeout)
            except _Refusal as exc:
                verdict = rules.classify_reply(exc.code, exc.message, exc.stage, account.rests)
                if verdict.kind is not rules.Kind.LOST:
                    if verdict.rests:
                        session.close()  # 421 closes it anyway; a resting account keeps none
                        lease.session = None
                    raise SendError(verdict) from exc
                reason = verdict.reason
            except _Lost as exc:
                reason = str(exc)
            else:
                session.messages += 1
                self.sent += 1
                self.sent_day_local += 1
                self.failures_in_row = 0
                return reply
            # The session is gone. A reused one (closed while idle, dropped): once
            # more on a fresh session. A fresh one: the account is in trouble.
            session.close()
            lease.session = None
            if fresh or retried:
                self.failures_in_row += 1
                raise SendError(rules.unreachable(self.failures_in_row, reason, account.rests))
            retried = True
            self.reconnects += 1
            log.info("smtp account %s: session lost (%s); sending on a fresh one",
                     self.name, reason)

    async def _open(self) -> Session:
        a = self.account
        smtp = aiosmtplib.SMTP(
            hostname=a.host, port=a.port, username=a.username or None,
            password=a.password or None, local_hostname=self.helo_name, timeout=a.timeout,
            use_tls=a.security == "tls", start_tls=a.security == "starttls",
            tls_context=self._tls_context() if a.security != "none" else None,
        )
        try:
            await smtp.connect()  # greeting, EHLO, STARTTLS + EHLO, AUTH
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
                raise SendError(self._refusal(rules.AUTH, exc.code, exc.message)) from exc
            if isinstance(exc, aiosmtplib.SMTPResponseException):  # greeting, EHLO, STARTTLS
                raise SendError(self._refusal(rules.CONNECT, exc.code, exc.message)) from exc
            if not isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
                raise
            cert = _ssl_cause(exc)
            if cert is not None:
                raise SendError(rules.refused(f"TLS {cert}", a.rests)) from exc
            if type(exc) in (aiosmtplib.SMTPException, aiosmtplib.SMTPNotSupported):
                # No AUTH or STARTTLS offered, no common AUTH mechanism: configuration.
                raise SendError(rules.refused(f"session refused: {exc}", a.rests)) from exc
            raise SendError(self._unreachable(exc)) from exc
        now = self.clock()
        self.connections += 1
        self.pipelining = smtp.supports_extension("pipelining")
        return Session(smtp, a.pipelining and self.pipelining, now)

    def _refusal(self, stage: str, code: int, message: str) -> rules.Verdict:
        verdict = rules.classify_reply(code, message, stage, self.account.rests)
        if verdict.kind in (rules.Kind.LOST, rules.Kind.DEFER, rules.Kind.RECIPIENT):
            # Refused before any message: it is the account's trouble, not the message's.
            self.failures_in_row += 1
            return rules.unreachable(self.failures_in_row, verdict.reason, self.account.rests)
        return verdict

    def _unreachable(self, exc: BaseException) -> rules.Verdict:
        self.failures_in_row += 1
        return rules.unreachable(self.failures_in_row, _describe(exc), self.account.rests)

    def _tls_context(self) -> ssl.SSLContext:
        # Built once per account (loading the CA store is slow), not per session.
        if self._tls is None:
            ctx = tls_context(self.account.ca_file)
            if not self.account.validate_certs:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._tls = ctx
        return self._tls

    # -- housekeeping ------------------------------------------------------------
    def reap(self, now: float) -> float:
        """Close idle sessions past idle_timeout, dead or too old; seconds until the
        next one is due."""
        keep: list[Session] = []
        for session in self._idle:
            if (not session.alive or rules.idle_expired(session.last_used, now, self.account.reuse)
                    or not rules.reusable(session.messages, session.opened_at, now,
                                          self.account.reuse)):
                self._retire(session)
            else:
                keep.append(session)
        self._idle = keep
        return rules.next_idle_check([s.last_used for s in keep], now, self.account.reuse)

    def _retire(self, session: Session) -> None:
        if not session.alive:
            session.close()
            return
        task = asyncio.get_running_loop().create_task(session.quit(),
                                                      name=f"smtp-quit-{self.name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        """Stop: QUIT every idle session, briefly; then close whatever is still open."""
        idle, self._idle = self._idle, []
        for session in idle:
            self._retire(session)
        if self._closing:
            _, late = await asyncio.wait(set(self._closing), timeout=_STOP_QUIT)
            for task in late:
                task.cancel()  # its finally closes the connection
            if late:
                await asyncio.wait(late, timeout=_STOP_QUIT)

    def status(self, now: float) -> dict[str, Any]:
        a = self.account
        sent_day = (self.sent_day + self.sent_day_local) if self.sent_day is not None else None
        return {
            "name": a.name,
            "host": a.host,
            "port": a.port,
            "security": a.security,
            "healthy": not self.resting(now),
            "resting": self.resting(now),
            "rest_left": round(self.rest_left(now), 1),
            "rest_reason": self.rest_reason if self.resting(now) else "",
            "rests": self.rests,
            "last_error": self.last_error,
            "sessions": {"open": self.open_sessions, "busy": self._leased,
                         "idle": len(self._idle), "max": a.max_sessions},
            "pipelining": self.pipelining,
            "connections": self.connections,
            "reconnects": self.reconnects,
            "sent": self.sent,
            "sent_day": sent_day,
            "max_per_day": a.max_per_day,
            "max_per_minute": a.max_per_minute,
        }


def _ssl_cause(exc: BaseException) -> str | None:
    """The TLS failure behind ``exc`` (certificate not trusted, bad handshake), if any."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted: {seen.verify_message or seen}"
        if isinstance(seen, ssl.SSLError):
            return f"handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
