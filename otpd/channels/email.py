"""Email channel: SMTP accounts in order, with failover, over reused sessions.

The sessions, their reuse and PIPELINING are ``smtp_sessions.AccountPool``'s;
what a refusal means and how long an account rests, ``smtp_rules``'. This
module only turns jobs into messages, picks the account (the first one in
the configured order that is not resting; the next one only when the ones
before it rest or fail for this message), counts the provider caps and turns
what happened into the engine's outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import socket
import time
from collections.abc import Callable
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from otpd.aio import STOP_BOUND, cancel_and_wait, raise_if_cancel_requested
from otpd.channels import smtp_rules as rules
from otpd.channels.email_settings import Sender, SmtpAccount, parse_sender
from otpd.channels.smtp_quota import QuotaError, SendQuota
from otpd.channels.smtp_sessions import AccountPool, Lease, SendError
from otpd.delivery.channel import (
    Capacity,
    Delivered,
    Failed,
    Job,
    Outcome,
    Retry,
    WorkSource,
)
from otpd.msisdn import InvalidReceiver, canonical_email, mask, split_mailbox
from otpd.wire.codes import Code
from otpd.wire.protocol import header_value_problem

log = logging.getLogger("otpd.channels.email")

# CRLF line ends, as SMTP wants them; long header lines folded.
_SMTP_POLICY = policy.SMTP
_QUOTA_REFRESH = 30.0  # s between reads of the shared daily counts (status only)
_WAIT_STEP = 1.0  # s a sender waiting for a session looks again at the accounts' rests
_WORKERS_PER_SESSION = 4
_MAX_WORKERS = 256
_SEND_TIME_WEIGHT = 0.1  # of each new hand-off in the observed send time


def recipient_of(job: Job) -> tuple[str, str]:
    """The job's one mailbox as (local part, ASCII domain), its subject checked.

    The service admits only valid ones; this catches rows stored before these
    checks existed. Raises InvalidReceiver or ValueError.
    """
    local, domain = split_mailbox(canonical_email(job.receiver))
    problem = header_value_problem(job.subject)
    if problem is not None:
        raise ValueError(f"subject {problem}")
    return local, domain


def build_message(account: SmtpAccount, job: Job) -> tuple[EmailMessage, str, str]:
    """The message and its envelope (sender, recipient), from validated values only.

    The envelope recipient is the job's one mailbox, given to the SMTP client
    explicitly: nothing is parsed back out of the headers (which would decode
    encoded words, comments and groups into other recipients).
    """
    sender = account.sender_parts
    local, domain = recipient_of(job)
    msg = EmailMessage()
    # Address(username=, domain=) quotes and encodes what it must and is not
    # re-parsed, unlike a string or addr_spec=.
    msg["From"] = Address(sender.display_name, sender.local, sender.domain)
    msg["To"] = Address("", local, domain)
    msg["Subject"] = job.subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=sender.domain)
    msg["Auto-Submitted"] = "auto-generated"
    # 7-bit clean whatever the text (quoted-printable when it is not ASCII), so
    # the bytes never depend on the server offering 8BITMIME.
    msg.set_content(job.text, subtype="plain", charset="utf-8",
                    cte=None if job.text.isascii() else "quoted-printable")
    return msg, sender.address, f"{local}@{domain}"


# An OTP text: printable ASCII lines short enough never to be folded or encoded.
_PLAIN_BODY = re.compile(r"[\x20-\x7e\t\n]*")
_PLAIN_LINE = 78  # email.policy.SMTP.max_line_length
_BODY_HEADERS = (b"Auto-Submitted: auto-generated\r\n"
                 b'Content-Type: text/plain; charset="utf-8"\r\n'
                 b"Content-Transfer-Encoding: 7bit\r\nMIME-Version: 1.0\r\n\r\n")


def _header_lines(name: str, value: str | Address) -> bytes:
    """One header as the email library writes it (encoded words, folding)."""
    msg = EmailMessage()
    msg[name] = value
    return msg.as_bytes(policy=_SMTP_POLICY).split(b"\r\n\r\n", 1)[0] + b"\r\n"


# Cached: an account's From and the usual subjects are the same for every message.
@functools.lru_cache(maxsize=64)
def _subject_header(subject: str) -> bytes:
    return _header_lines("Subject", subject)


@functools.lru_cache(maxsize=16)
def _from_header(sender: str) -> tuple[bytes, Sender]:
    parts = parse_sender(sender)
    return _header_lines("From", Address(parts.display_name, parts.local, parts.domain)), parts


def render_message(account: SmtpAccount, job: Job) -> tuple[bytes, str, str]:
    """The message as SMTP bytes and its envelope: what :func:`build_message` gives,
    written directly for the usual OTP (printable ASCII text), since building an
    ``EmailMessage`` and its headers costs more than the rest of a send."""
    text = job.text
    if not (_PLAIN_BODY.fullmatch(text)
            and all(len(line) <= _PLAIN_LINE for line in text.splitlines())):
        message, sender, recipient = build_message(account, job)
        return message.as_bytes(policy=_SMTP_POLICY), sender, recipient
    from_lines, parts = _from_header(account.sender)
    local, domain = recipient_of(job)  # ASCII dot-atom @ ASCII domain: written as is
    recipient = f"{local}@{domain}"
    head = b"".join((
        from_lines,
        b"To: " + recipient.encode("ascii") + b"\r\n",
        _subject_header(job.subject),
        b"Date: " + formatdate(localtime=False, usegmt=True).encode("ascii") + b"\r\n",
        b"Message-ID: " + make_msgid(domain=parts.domain).encode("ascii") + b"\r\n",
        _BODY_HEADERS,
    ))
    body = "\r\n".join(text.splitlines()).encode("ascii") + b"\r\n"
    return head + body, parts.address, recipient


class SmtpChannel:
    name = "email"

    def __init__(
        self, accounts: tuple[SmtpAccount, ...], workers: int, retry_base: float,
        retry_max: float, quota: SendQuota | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.accounts = accounts
        # Senders: the sessions the largest account may open (strict failover: one
        # account sends at a time). ``workers`` (delivery.email_workers) is what
        # the channel ran before sessions were pooled; the pools decide now.
        self.senders = max((a.max_sessions for a in accounts), default=workers)
        # Workers: a few per session, since a worker also waits for the store
        # (the attempt and the outcome are written durably around each send) and
        # holds a session only while it sends.
        self.workers = min(self.senders * _WORKERS_PER_SESSION, _MAX_WORKERS)
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.quota = quota
        self.clock = clock  # wall time for the store's windows; rests are monotonic
        self.pools = [AccountPool(a, on_change=self._changed) for a in accounts]
        self._change = asyncio.Event()
        self.sent = 0
        self.failed = 0
        self.send_time: float | None = None  # s per hand-off, smoothed
        self._quota_read_at = -1e9
        self._recording: set[asyncio.Future[None]] = set()  # outcomes being written

    def configured(self) -> bool:
        return bool(self.accounts)

    def usable(self) -> bool:
        now = time.monotonic()
        return any(not p.resting(now) for p in self.pools)

    def _sending_pool(self, now: float) -> AccountPool | None:
        """The account new messages go to: the first one not resting."""
        return next((p for p in self.pools if not p.resting(now)), None)

    def capacity(self) -> Capacity:
        """Senders: sessions the sending account may have open at once; ready: those,
        unless every account rests; busy: its sessions sending now."""
        if not self.accounts:
            return Capacity(ready=0, senders=0, reason="no SMTP account")
        now = time.monotonic()
        pool = self._sending_pool(now)
        if pool is None:
            reasons = "; ".join(f"{p.name}: {p.rest_reason}" for p in self.pools)
            return Capacity(ready=0, senders=self.senders, send_time=self.send_time,
                            reason=f"every SMTP account is resting ({reasons})")
        return Capacity(ready=pool.account.max_sessions, senders=self.senders,
                        busy=min(pool.busy, pool.account.max_sessions),
                        send_time=self.send_time)

    def summary(self) -> str:
        """For the one-line service status, e.g. ``smtp 1/2 ok`` ("" = no account)."""
        if not self.accounts:
            return ""
        now = time.monotonic()
        ok = sum(1 for p in self.pools if not p.resting(now))
        return f"smtp {ok}/{len(self.pools)} ok"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "accounts": [p.status(now) for p in self.pools],
            "sent": self.sent,
            "failed": self.failed,
            "send_time": self.send_time,
        }

    # -- running -------------------------------------------------------------
    def _changed(self) -> None:
        """A session came back or a rest changed: senders waiting look again."""
        self._change.set()
        self._change = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._change.wait()
        except TimeoutError:
            pass

    async def run(self, source: WorkSource) -> None:
        if not self.accounts:
            await asyncio.Event().wait()  # nothing to do until cancelled
        # The EHLO name: this host's FQDN, looked up once (it can take a while).
        fqdn = await asyncio.to_thread(socket.getfqdn)
        for pool in self.pools:
            pool.helo_name = pool.account.helo_name or fqdn or "localhost"
        tasks = [asyncio.create_task(self._worker(source), name=f"smtp-worker-{i}")
                 for i in range(self.workers)]
        tasks.append(asyncio.create_task(self._housekeeping(), name="smtp-housekeeping"))
        try:
            # Workers end only by a bug (raised here) or a cancellation.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            # Not a TaskGroup or gather: they cancel their tasks once, and a worker
            # inside an SMTP exchange can lose that one request (see otpd.aio).
            await cancel_and_wait(tasks, "the SMTP workers", log)
            # Never cancelled: an outcome not recorded means a sent mail goes again.
            if self._recording:
                await asyncio.wait(set(self._recording), timeout=STOP_BOUND)
            await asyncio.gather(*(p.close_all() for p in self.pools))

    async def _worker(self, source: WorkSource) -> None:
        while True:
            # Take a job only when it can go now: the sending account has a session
            # free (or every account rests, and the job is put back at once, saying
            # why). Jobs wait in the engine's queue meanwhile, not in a sender.
            await self._room()
            job = await source.take()
            try:
                outcome = await self.deliver(job)
            except Exception as exc:  # a bug must not stop the worker
                log.exception("email %d: unexpected error", job.id)
                outcome = Retry(f"internal error: {type(exc).__name__}", self._delay(job))
            recording = asyncio.ensure_future(source.finish(job, outcome))
            self._recording.add(recording)
            recording.add_done_callback(self._recording.discard)
            await asyncio.shield(recording)
            # aiosmtplib may have swallowed a stop request (see otpd.aio): the
            # outcome is on record, so stop now instead of taking more work.
            raise_if_cancel_requested()

    async def _room(self) -> None:
        while True:
            now = time.monotonic()
            pool = self._sending_pool(now)
            if pool is None or pool.has_room(now):
                return
            await self._wait_change(_WAIT_STEP)

    async def _housekeeping(self) -> None:
        """Close idle sessions when they are due; read the shared daily counts."""
        while True:
            now = time.monotonic()
            wait = min([p.reap(now) for p in self.pools] + [_QUOTA_REFRESH])
            if self.quota is not None and now - self._quota_read_at >= _QUOTA_REFRESH:
                self._quota_read_at = now
                await self._read_daily_counts()
            await asyncio.sleep(wait)

    async def _read_daily_counts(self) -> None:
        assert self.quota is not None
        for pool in self.pools:
            if not pool.account.max_per_day:
                continue
            try:
                local = pool.sent_day_local
                pool.sent_day = await self.quota.sent_day(pool.name, self.clock())
                pool.sent_day_local -= local  # those are in the store's count now
            except QuotaError as exc:
                log.warning("smtp account %s: cannot read the daily count: %s", pool.name, exc)

    # -- one message ---------------------------------------------------------
    def _delay(self, job: Job) -> float:
        base: float = min(self.retry_base * 2.0 ** min(job.attempts, 16), self.retry_max)
        return base * random.uniform(0.8, 1.2)

    async def _lease(self, tried: set[str]) -> Lease | None:
        """A session of the first account not tried yet for this message and not
        resting; waits while that account's sessions are all busy. None: no
        account is left to try."""
        while True:
            now = time.monotonic()
            pool = next((p for p in self.pools
                         if p.name not in tried and not p.resting(now)), None)
            if pool is None:
                return None
            lease = pool.lease(now)
            if lease is not None:
                return lease
            await self._wait_change(_WAIT_STEP)

    async def _reserve(self, pool: AccountPool) -> float:
        """Count this message against the account's caps; seconds to wait if over."""
        a = pool.account
        if self.quota is None or not (a.max_per_minute or a.max_per_day):
            return 0.0
        try:
            return await self.quota.reserve(a.name, a.max_per_minute, a.max_per_day,
                                            self.clock())
        except QuotaError as exc:
            # The store is down: the engine cannot record outcomes either. Send
            # (as the modem pool does) rather than hold every OTP back.
            log.error("smtp account %s: cannot count the message against its caps: %s",
                      a.name, exc)
            return 0.0

    async def deliver(self, job: Job) -> Outcome:
        try:
            # A bad receiver or subject fails for good, at once: retrying it
            # would fail the same way at every attempt until it expires.
            recipient_of(job)
        except (InvalidReceiver, ValueError) as exc:
            self.failed += 1
            log.warning("email %d to %r: refused: %s", job.id, mask(job.receiver), exc)
            return Failed(f"not sent: {exc}", Code.FAILED)
        errors: list[str] = []
        tried: set[str] = set()
        while (lease := await self._lease(tried)) is not None:
            pool = lease.pool
            tried.add(pool.name)
            try:
                wait = await self._reserve(pool)
                if wait > 0:
                    caps = [f"max_per_minute = {pool.account.max_per_minute}"
                            if pool.account.max_per_minute else "",
                            f"max_per_day = {pool.account.max_per_day}"
                            if pool.account.max_per_day else ""]
                    pool.rest(wait, f"cap reached ({', '.join(c for c in caps if c)})")
                    errors.append(f"{pool.name}: {pool.rest_reason}")
                    continue
                content, sender, recipient = render_message(pool.account, job)
                started = time.monotonic()
                await pool.transmit(lease, sender, recipient, content)
            except SendError as exc:
                verdict = exc.verdict
                log.warning("email %d to %s: account %s: %s", job.id, mask(job.receiver),
                            pool.name, verdict.reason)
                if verdict.kind is rules.Kind.RECIPIENT:
                    self.failed += 1
                    return Failed(f"{verdict.reason} (account {pool.name})", Code.FAILED)
                if verdict.kind is rules.Kind.DEFER:
                    pool.last_error = verdict.reason
                    return Retry(f"{pool.name}: {verdict.reason}", self._delay(job))
                pool.rest(verdict.seconds, verdict.reason)
                errors.append(f"{pool.name}: {verdict.reason}")
                continue
            finally:
                pool.give_back(lease)
            took = time.monotonic() - started
            self.send_time = took if self.send_time is None else (
                self.send_time + _SEND_TIME_WEIGHT * (took - self.send_time))
            self.sent += 1
            return Delivered(via=pool.name)
        # Every account failed for this message or is resting: again when the
        # first rest ends (the rests back off, so an outage costs few attempts).
        now = time.monotonic()
        for pool in self.pools:
            if pool.name not in tried:
                errors.append(f"{pool.name}: resting {pool.rest_left(now):.0f} s"
                              f" ({pool.rest_reason})")
        first_back = min((p.rest_left(now) for p in self.pools), default=0.0)
        delay = max(first_back, 0.1) * random.uniform(1.0, 1.2)
        return Retry("; ".join(errors) or "no SMTP account", delay)

