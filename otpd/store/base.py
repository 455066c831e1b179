"""What the service and the delivery engine need from a store.

Two implementations: :class:`~otpd.store.sqlite.SqliteStore` keeps everything
in one local SQLite file; :class:`~otpd.store.redis_state.RedisSharedStore`
keeps what several nodes must share (OTPs, block list, message ids, rate
counters, the replay cache of signed commands) in Redis and each node's own
outbox in its local SQLite file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from otpd.store.records import (
    Claim,
    Duplicate,
    Finished,
    HourActivity,
    Inserted,
    MessageRow,
    NewMessage,
    NewOtp,
    OtpRecord,
    RateLimit,
    SmsOutcome,
    SmsPart,
    SmsReport,
    SmsReportMatch,
    SmsUnreported,
    VerifyResult,
)


class Store(Protocol):
    async def close(self) -> None: ...

    async def check_writable(self, *, local_only: bool = False) -> None:
        """A real write; ``local_only`` skips shared state (Redis) for the watchdog,
        since restarting otpd cannot fix a Redis outage."""
        ...

    # outbox (always local to the node that acknowledged the command)
    async def insert_message(
        self, msg: NewMessage, otp: NewOtp | None = None
    ) -> Inserted | Duplicate: ...

    async def pending_messages(self) -> list[MessageRow]: ...

    async def message(self, message_id: int) -> MessageRow | None: ...

    async def recent_messages(self, states: Sequence[str], limit: int) -> list[MessageRow]:
        """Newest first, for the operator's ``otpd outbox``."""
        ...

    async def mark_attempt(self, message_id: int, now: float) -> None: ...

    async def record_retry(
        self, message_id: int, attempts: int, next_attempt_at: float, reason: str
    ) -> None: ...

    async def finish_message(
        self,
        message_id: int,
        *,
        state: str,
        code: str,
        reason: str,
        via: str,
        attempts: int,
        now: float,
    ) -> Finished: ...

    async def duplicate_of(self, dedupe_key: str | None, reference: str | None
                           ) -> Duplicate | None:
        """Would a message with this id (or an OTP with this reference) be a duplicate?"""
        ...

    async def claim_id(self, dedupe_key: str) -> Duplicate | None:
        """Hold a message id, so that from now on a message with it is refused as
        a duplicate (a hand-over copy that may still be on its way); None: held
        now; else the message that has it."""
        ...

    async def release_id(self, dedupe_key: str) -> None:
        """Let a message id held with :meth:`claim_id` be accepted again."""
        ...

    # SMS delivery reports (local, like the outbox: sent parts and delivery states)
    async def record_sms_parts(self, parts: Sequence[SmsPart]) -> None:
        """The parts of one message, sent asking for status reports; its
        ``delivery`` becomes ``sent`` (a resend replaces the earlier parts)."""
        ...

    async def apply_sms_report(self, report: SmsReport) -> SmsReportMatch | None:
        """Apply a status report to the newest unfinished part with its SIM,
        TP-MR and recipient, and the message's delivery state; None: no match."""
        ...

    async def expire_sms_reports(self, sent_before: float, now: float) -> list[SmsUnreported]:
        """Messages still ``sent`` whose last part went before ``sent_before``
        become ``unknown``; returns them."""
        ...

    async def sms_outcomes(self, since: float) -> list[SmsOutcome]:
        """Final delivery states reached since ``since``, oldest first."""
        ...

    async def hourly_activity(self, since: float) -> list[HourActivity]:
        """Sent, failed and delivered messages per hour, channel and sender since
        ``since`` (the status page's chart), oldest hour first."""
        ...

    # shared state
    async def verify_otp(
        self,
        reference: str,
        now: float,
        matches: Callable[[OtpRecord], bool],
        max_attempts: int,
    ) -> VerifyResult: ...

    async def block(self, receiver: str, now: float) -> None: ...

    async def unblock(self, receiver: str) -> bool: ...

    async def is_blocked(self, receiver: str) -> bool: ...

    async def blocked(self) -> list[str]: ...

    async def rate_hit(
        self, limits: Sequence[RateLimit], now: float, *, record: bool = True
    ) -> float:
        """All-or-nothing: record a hit under every limit and return 0.0, or
        record nothing and return the seconds until all would allow it.
        ``record=False`` only checks."""
        ...

    # replay cache of signed commands: claim, execute, then settle (or release)
    async def claim_command(self, key: str, holder: str, now: float, claim_ttl: float
                            ) -> Claim:
        """Atomically: an absent or expired ``key`` becomes a pending claim by
        ``holder`` until ``now + claim_ttl`` (NEW); a settled one answers SEEN;
        a live pending one, whoever holds it, BUSY. ``key`` is 1 to 128 hex
        digits, compared case-insensitively (ValueError otherwise)."""
        ...

    async def settle_command(self, key: str, holder: str, until: float) -> None:
        """The command ran: answer SEEN for ``key`` until ``until``. Durable on
        return. No effect when another holder has claimed or settled the key
        since (a claim that lapsed untaken is still this holder's)."""
        ...

    async def release_command(self, key: str, holder: str) -> None:
        """The command did not run: forget ``holder``'s pending claim so that a
        redelivery runs it. No effect on a settled key or another's claim."""
        ...

    async def purge(self, otp_before: float, messages_before: float) -> tuple[int, int]:
        """Delete OTPs expired before ``otp_before``, final messages finished
        before ``messages_before`` and replay-cache entries expired before
        ``otp_before``; returns (otps, messages) deleted."""
        ...

    async def counts(self) -> dict[str, int]: ...
