"""Email channel: SMTP accounts with failover, via aiosmtplib."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import aiosmtplib

from otpd.aio import STOP_BOUND, cancel_and_wait, raise_if_cancel_requested
from otpd.channels.email_settings import SmtpAccount
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

# How long an account that failed is tried only after the healthy ones.
_ACCOUNT_COOLDOWN = 60.0


class RecipientRejected(Exception):
    """The server refused the recipient or the message for good (5xx)."""


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
    msg.set_content(job.text, subtype="plain", charset="utf-8")
    return msg, sender.address, f"{local}@{domain}"


class SmtpChannel:
    name = "email"

    def __init__(
        self, accounts: tuple[SmtpAccount, ...], workers: int, retry_base: float, retry_max: float
    ) -> None:
        self.accounts = accounts
        self.workers = workers
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._failed_at: dict[str, float] = {}
        self._last_error: dict[str, str] = {}
        self.sent = 0
        self.failed = 0
        self._recording: set[asyncio.Future[None]] = set()  # outcomes being written

    def configured(self) -> bool:
        return bool(self.accounts)

    def usable(self) -> bool:
        return bool(self.accounts)

    def capacity(self) -> Capacity:
        """SMTP workers, while an account is reachable (none failed within its cooldown)."""
        if not self.accounts:
            return Capacity(ready=0, senders=0, reason="no SMTP account")
        if not any(a["healthy"] for a in self.status()["accounts"]):
            return Capacity(ready=0, senders=self.workers, reason="no SMTP account reachable")
        return Capacity(ready=self.workers, senders=self.workers)

    def summary(self) -> str:
        """For the one-line service status, e.g. ``smtp 1/2 ok`` ("" = no account)."""
        if not self.accounts:
            return ""
        accounts = self.status()["accounts"]
        ok = sum(1 for a in accounts if a["healthy"])
        return f"smtp {ok}/{len(accounts)} ok"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "accounts": [
                {
                    "name": a.name,
                    "host": a.host,
                    "port": a.port,
                    "healthy": now - self._failed_at.get(a.name, -1e9) > _ACCOUNT_COOLDOWN,
                    "last_error": self._last_error.get(a.name, ""),
                }
                for a in self.accounts
            ],
            "sent": self.sent,
            "failed": self.failed,
        }

    async def run(self, source: WorkSource) -> None:
        if not self.accounts:
            await asyncio.Event().wait()  # nothing to do until cancelled
        workers = [asyncio.create_task(self._worker(source), name=f"smtp-worker-{i}")
                   for i in range(self.workers)]
        try:
            # Workers end only by a bug (raised here) or a cancellation.
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            # Not a TaskGroup or gather: they cancel their tasks once, and a worker
            # inside an SMTP exchange can lose that one request (see otpd.aio).
            await cancel_and_wait(workers, "the SMTP workers", log)
            # Never cancelled: an outcome not recorded means a sent mail goes again.
            if self._recording:
                await asyncio.wait(set(self._recording), timeout=STOP_BOUND)

    async def _worker(self, source: WorkSource) -> None:
        while True:
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

    def _ordered_accounts(self) -> list[SmtpAccount]:
        now = time.monotonic()
        healthy = [a for a in self.accounts
                   if now - self._failed_at.get(a.name, -1e9) > _ACCOUNT_COOLDOWN]
        resting = [a for a in self.accounts if a not in healthy]
        return healthy + resting

    def _delay(self, job: Job) -> float:
        base: float = min(self.retry_base * 2.0 ** min(job.attempts, 16), self.retry_max)
        return base * random.uniform(0.8, 1.2)

    async def deliver(self, job: Job) -> Outcome:
        errors: list[str] = []
        try:
            # A bad receiver or subject fails for good, at once: retrying it
            # would fail the same way at every attempt until it expires.
            recipient_of(job)
        except (InvalidReceiver, ValueError) as exc:
            self.failed += 1
            log.warning("email %d to %r: refused: %s", job.id, mask(job.receiver), exc)
            return Failed(f"not sent: {exc}", Code.FAILED)
        for account in self._ordered_accounts():
            try:
                await self._send_via(account, job)
            except RecipientRejected as exc:
                self.failed += 1
                return Failed(f"rejected by {account.name}: {exc}", Code.FAILED)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                reason = _describe(exc)
                self._failed_at[account.name] = time.monotonic()
                self._last_error[account.name] = reason
                errors.append(f"{account.name}: {reason}")
                log.warning("email %d to %s: account %s failed: %s", job.id, mask(job.receiver),
                            account.name, reason)
                continue
            self._failed_at.pop(account.name, None)
            self.sent += 1
            return Delivered(via=account.name)
        return Retry("; ".join(errors) or "no SMTP account", self._delay(job))

    async def _send_via(self, account: SmtpAccount, job: Job) -> None:
        message, sender, recipient = build_message(account, job)
        try:
            errors, _ = await aiosmtplib.send(
                message,
                sender=sender,
                recipients=[recipient],
                hostname=account.host,
                port=account.port,
                username=account.username or None,
                password=account.password or None,
                use_tls=account.security == "tls",
                start_tls=account.security == "starttls",
                timeout=account.timeout,
                validate_certs=account.validate_certs,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(r.code >= 500 for r in exc.recipients):
                raise RecipientRejected(_describe(exc)) from exc
            raise
        except aiosmtplib.SMTPDataError as exc:
            if exc.code >= 500:
                raise RecipientRejected(_describe(exc)) from exc
            raise
        if errors:  # a refused recipient among several (we only ever send to one)
            raise RecipientRejected(str(errors))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
