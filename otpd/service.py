"""Executes commands: the only place where otpd's business rules live.

Transports hand in a parsed :class:`~otpd.wire.protocol.Envelope`; the service
checks the receiver, block list and lifetimes, stores what must be sent (with
the OTP hash, atomically), hands it to the delivery engine and answers with a
:class:`~otpd.wire.protocol.Response`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from otpd.aio import within
from otpd.auth.login_gate import LoginGate, address_group
from otpd.delivery.channel import Channel, Job
from otpd.delivery.engine import DeliveryEngine, Result
from otpd.delivery.handover import handover_context
from otpd.delivery.settings import DeliverySettings
from otpd.grants import (
    MODEM_IDENTITY,
    Grants,
    grant_for,
    rest_grant_key,
    without_identity,
)
from otpd.limits import Limiter
from otpd.metrics import Metrics
from otpd.msisdn import InvalidReceiver, canonical_receiver, is_email, mask
from otpd.otp import generate_code, new_salt, otp_digest, otp_matches
from otpd.otp_attempts import VERIFY_RESPONSES
from otpd.otp_settings import OtpSettings
from otpd.sealing import Sealer, SealError
from otpd.store import (
    Duplicate,
    NewMessage,
    NewOtp,
    OtpRecord,
    Store,
    StoreError,
    VerifyResult,
)
from otpd.wire.codes import Code
from otpd.wire.protocol import (
    BlockMsisdn,
    Command,
    Echo,
    Envelope,
    GetModemList,
    Handover,
    ProtocolError,
    RequestOtp,
    RequestUssd,
    Response,
    SendEmail,
    SendMessage,
    SendSms,
    UnblockMsisdn,
    VerifyOtp,
    render_template,
)

log = logging.getLogger("otpd.service")

OnStored = Callable[[], Awaitable[None]]


class Service:
    """Handed the slices of the settings it applies (the OTP rules, delivery
    wait and lifetimes) and its limiter, never the daemon's settings root."""

    def __init__(
        self,
        otp: OtpSettings,
        delivery: DeliverySettings,
        limiter: Limiter,
        store: Store,
        engine: DeliveryEngine,
        channels: dict[str, Channel],
        server_key: bytes,
        sealer: Sealer,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.otp = otp
        self.delivery = delivery
        self.store = store
        self.engine = engine
        self.channels = channels
        self.key = server_key
        self.sealer = sealer
        self.clock = clock
        self.limiter = limiter
        lim = limiter.s
        # REST logins on this node: reserved before the password check, checks in
        # flight capped per address group (see otpd.auth.login_gate).
        self.login_gate = LoginGate(
            max_failures=lim.auth_failures_max if lim.enabled else None,
            window=lim.auth_window)

    # -- REST logins (credential stuffing) ------------------------------------------
    # A login: login_blocked (the store's window, shared by the nodes), then
    # login_gate.reserve (this node, holds under concurrency), the password check,
    # ticket.release, and login_failed on a failure. Addresses count by group.
    async def login_blocked(self, ip: str) -> float:
        """Seconds this address must wait before its next login attempt (0 = none)."""
        return await self.limiter.auth_blocked(address_group(ip), self.clock())

    async def login_failed(self, ip: str) -> bool:
        """Count a failed login; True when limits apply (the caller slows down)."""
        await self.limiter.auth_failed(address_group(ip), self.clock())
        return self.limiter.enabled

    # -- block list: every path (commands, the control socket) comes here ----------
    async def block(self, receiver: str, *, by: str) -> str:
        """Block a receiver; returns its canonical form. Raises InvalidReceiver."""
        canonical = canonical_receiver(receiver, self.otp.country_code)
        await self.store.block(canonical, self.clock())
        log.info("%s blocked %s", by, mask(canonical))
        return canonical

    async def unblock(self, receiver: str, *, by: str) -> tuple[str, bool]:
        """Unblock a receiver: its canonical form and whether it was blocked."""
        canonical = canonical_receiver(receiver, self.otp.country_code)
        removed = await self.store.unblock(canonical)
        log.info("%s unblocked %s%s", by, mask(canonical), "" if removed else " (was not blocked)")
        return canonical, removed

    async def execute(
        self,
        env: Envelope,
        *,
        wait: float | None = None,
        on_stored: OnStored | None = None,
        transport: str = "",
        ip: str | None = None,
        grants: Grants | None = None,
    ) -> Response:
        """Run one command. ``on_stored`` is awaited once the command is durable
        (brokers acknowledge there); ``wait`` bounds the wait for a send result.
        ``transport`` names the client for limits (``rest:<user>``, ``amqp``...).
        ``grants``: what this client may run (None: the defaults, no operational
        command)."""
        cmd = env.command
        wait = self.delivery.wait if wait is None else wait
        client = transport or "-"
        grants = Grants() if grants is None else grants
        try:
            # Request rates are limited per REST user and address; a broker command
            # refused here would be dropped, so brokers have the per-receiver and
            # distinct-receiver limits (and the broker's own ACLs) instead.
            retry_after = 0.0
            if client.startswith("rest:"):
                retry_after = await self.limiter.command(client, ip, self.clock())
            if retry_after > 0:
                response = _limited(env.name, cmd, retry_after, "too many requests")
            elif (refused := self._authorize(env.name, cmd, grants, client)) is not None:
                response = refused
            else:
                response = await self._dispatch(env.name, cmd, wait, on_stored, client, grants,
                                                ip)
        except ProtocolError as exc:
            response = Response(env.name, exc.code, _echo(cmd, None), exc.message)
        except StoreError as exc:
            log.error("%s: %s", env.name, exc)
            response = Response(env.name, Code.FAILED, _echo(cmd, None),
                                "the gateway cannot store the request right now; retry later",
                                transient=True)
        if self.metrics is not None:
            self._count(client, env.name, cmd, response)
        if log.isEnabledFor(logging.INFO):
            receiver = getattr(cmd, "receiver", "")
            log.info("%s %s%s -> %s", transport or "-", env.name,
                     f" {mask(receiver)}" if receiver else "", response.code.value)
        return response

    def _authorize(self, name: str, cmd: Command, grants: Grants,
                   client: str) -> Response | None:
        """The refusal (1100) of a command these grants do not cover, or None."""
        grant = grant_for(cmd.name)
        if grants.allows(grant):
            return None
        setting = grants.setting or _grant_setting(client)
        log.warning("%s: refused %s: not granted (add %r to %s)", client, name, grant, setting)
        return Response(name, Code.UNAUTHORIZED, _echo(cmd, None),
                        f"unauthorized: {name} is not granted to this client;"
                        f" the operator grants it with {setting} = [\"{grant}\"]")

    def _count(self, client: str, name: str, cmd: Command, response: Response) -> None:
        assert self.metrics is not None
        transport = client.partition(":")[0]  # "rest:<user>" -> rest: bounded labels
        self.metrics.commands.labels(transport, name, response.code.value).inc()
        event = None
        if isinstance(cmd, RequestOtp) and response.code in (Code.SUCCESS, Code.PENDING):
            event = "created"
        elif isinstance(cmd, VerifyOtp):
            event = {Code.SUCCESS: "verified", Code.INVALID_OTP: "failed",
                     Code.TOO_MANY_ATTEMPTS: "burned", Code.EXPIRED: "expired"}.get(response.code)
        if event is not None:
            self.metrics.otp.labels(event).inc()

    async def _dispatch(
        self, name: str, cmd: Command, wait: float, on_stored: OnStored | None, client: str,
        grants: Grants, ip: str | None = None,
    ) -> Response:
        match cmd:
            case RequestOtp():
                return await self._request_otp(name, cmd, wait, on_stored, client)
            case SendSms() | SendEmail() | SendMessage():
                return await self._send(name, cmd, wait, on_stored, client)
            case VerifyOtp():
                return await self._verify(name, cmd, client, ip)
            case BlockMsisdn():
                await self.block(self._receiver(cmd.receiver), by=client)
                return Response(name, Code.SUCCESS, _echo(cmd, None))
            case UnblockMsisdn():
                await self.unblock(self._receiver(cmd.receiver), by=client)
                return Response(name, Code.SUCCESS, _echo(cmd, None))
            case GetModemList():
                status = self.channels["sms"].status()
                modems = {m.get("name", str(i)): m for i, m in enumerate(status.get("modems", []))}
                if not grants.allows(MODEM_IDENTITY):
                    # IMSI, IMEI and the like identify the SIM and the handset. Per
                    # modem: a modem may be named like a field ("sim", "port").
                    modems = {n: without_identity(m) for n, m in modems.items()}
                return Response(name, Code.SUCCESS, {"modem_list": modems})
            case RequestUssd():
                return await self._ussd(name, cmd, grants, client)
            case Echo():
                return Response(name, Code.SUCCESS, cmd.data)
            case Handover():
                return await self._handover(name, cmd, wait, on_stored)
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"command: {name} is not supported", name)

    # -- sending ---------------------------------------------------------------
    def _receiver(self, receiver: str) -> str:
        try:
            return canonical_receiver(receiver, self.otp.country_code)
        except InvalidReceiver as exc:
            raise ProtocolError(Code.INVALID_REQUEST, f"data.receiver: {exc}") from None

    def _channel_for(self, cmd: Command, receiver: str) -> str:
        if isinstance(cmd, SendSms):
            if is_email(receiver):
                raise ProtocolError(Code.INVALID_REQUEST,
                                    "data.receiver: send-sms needs a phone number")
            return "sms"
        if isinstance(cmd, SendEmail):
            if not is_email(receiver):
                raise ProtocolError(Code.INVALID_REQUEST,
                                    "data.receiver: send-email needs an email address")
            return "email"
        return "email" if is_email(receiver) else "sms"

    def _unavailable(self, name: str, cmd: Command, channel: str) -> Response | None:
        if self.channels[channel].configured():
            return None
        if channel == "sms":
            return Response(name, Code.SERIAL_PORT_NULL, _echo(cmd, None),
                            "no SMS modem is configured")
        return Response(name, Code.FAILED, _echo(cmd, None), "no SMTP account is configured")

    def _expires_at(self, expiration: int | None, now: float, default: int, maximum: int) -> float:
        if expiration is None:
            return now + default
        return float(min(expiration, now + maximum))

    async def _prepare(
        self, name: str, cmd: RequestOtp | SendSms | SendEmail | SendMessage, client: str
    ) -> tuple[str, str, float] | Response:
        """Receiver, channel and expiry; or the response refusing the command."""
        receiver = self._receiver(cmd.receiver)
        channel = self._channel_for(cmd, receiver)
        if await self.store.is_blocked(receiver):
            return Response(name, Code.BLOCKED, _echo(cmd, None), "receiver is blocked")
        outside = self.limiter.receiver_refusal(receiver, self.otp.country_code)
        if outside is not None:
            return Response(name, Code.BLOCKED, _echo(cmd, None), outside)
        refused = self._unavailable(name, cmd, channel)
        if refused is not None:
            return refused
        now = self.clock()
        retry_after = await self.limiter.send(client, receiver, now)
        if retry_after > 0:
            # A repeat of an accepted message is a duplicate, not abuse: say so.
            duplicate = await self.store.duplicate_of(
                _dedupe_key(cmd, receiver), cmd.reference if isinstance(cmd, RequestOtp) else None)
            if duplicate is not None:
                return _duplicate_response(name, cmd, duplicate)
            return _limited(name, cmd, retry_after, "too many messages to this receiver")
        if isinstance(cmd, RequestOtp):
            lifetimes = (self.otp.default_lifetime, self.otp.max_lifetime)
        else:
            lifetimes = (self.delivery.default_lifetime,
                         self.delivery.max_lifetime)
        expires_at = self._expires_at(cmd.expiration, now, *lifetimes)
        if expires_at <= now:
            return Response(name, Code.EXPIRED, _echo(cmd, None), "expiration is already past")
        return receiver, channel, expires_at

    async def _request_otp(
        self, name: str, cmd: RequestOtp, wait: float, on_stored: OnStored | None, client: str
    ) -> Response:
        prepared = await self._prepare(name, cmd, client)
        if isinstance(prepared, Response):
            return prepared
        receiver, channel, expires_at = prepared
        now = self.clock()
        code = generate_code(self.otp.length)
        salt = new_salt()
        digest = otp_digest(self.key, salt, cmd.reference, code, receiver, cmd.params)
        subject = cmd.subject or self.otp.email_subject
        text = render_template(cmd.message, code)
        del code  # from here on only the sealed outbox text holds it
        msg = NewMessage(
            command=name, channel=channel, receiver=receiver, subject=subject,
            sealed=self.sealer.seal(text, receiver), created_at=now, expires_at=expires_at,
        )
        msg = replace(msg, otp_reference=cmd.reference)
        otp_row = NewOtp(cmd.reference, receiver, salt, digest, now, expires_at)
        queued = await self._store_and_submit(msg, text, otp_row)
        if isinstance(queued, Duplicate):
            return _duplicate_response(name, cmd, queued)
        return await self._deliver(name, cmd, queued, wait, on_stored)

    async def _send(
        self, name: str, cmd: SendSms | SendEmail | SendMessage, wait: float,
        on_stored: OnStored | None, client: str,
    ) -> Response:
        prepared = await self._prepare(name, cmd, client)
        if isinstance(prepared, Response):
            return prepared
        receiver, channel, expires_at = prepared
        subject = ""
        if channel == "email":
            subject = getattr(cmd, "subject", None) or self.otp.email_subject
        msg = NewMessage(
            command=name, channel=channel, receiver=receiver, subject=subject,
            sealed=self.sealer.seal(cmd.message, receiver), created_at=self.clock(),
            expires_at=expires_at,
            dedupe_key=_dedupe_key(cmd, receiver),
        )
        queued = await self._store_and_submit(msg, cmd.message)
        if isinstance(queued, Duplicate):
            return _duplicate_response(name, cmd, queued)
        return await self._deliver(name, cmd, queued, wait, on_stored)

    async def _handover(self, name: str, cmd: Handover, wait: float,
                        on_stored: OnStored | None) -> Response:
        """A message another node stored and could not send in time. It was
        admitted there (limits counted once), so only what may have changed
        since is checked again: the block list, the allowed ranges, expiry."""
        context = handover_context(cmd.channel, cmd.receiver, cmd.subject, cmd.expiration,
                                   cmd.id)
        try:
            text = self.sealer.open_handover(cmd.sealed, context)
        except SealError as exc:
            # %r: the id is the sender's text (no line breaks into the log)
            log.warning("%s %r: %s", name, cmd.id, exc)
            return Response(name, Code.UNAUTHORIZED, _echo(cmd, None), str(exc))
        receiver = self._receiver(cmd.receiver)
        if (cmd.channel == "email") != is_email(receiver):
            raise ProtocolError(Code.INVALID_REQUEST, "data.channel: does not fit the receiver")
        if await self.store.is_blocked(receiver):
            return Response(name, Code.BLOCKED, _echo(cmd, None), "receiver is blocked")
        outside = self.limiter.receiver_refusal(receiver, self.otp.country_code)
        if outside is not None:
            return Response(name, Code.BLOCKED, _echo(cmd, None), outside)
        refused = self._unavailable(name, cmd, cmd.channel)
        if refused is not None:
            return refused
        now = self.clock()
        if cmd.expiration <= now:
            return Response(name, Code.EXPIRED, _echo(cmd, None), "expiration is already past")
        msg = NewMessage(
            command=name, channel=cmd.channel, receiver=receiver, subject=cmd.subject,
            sealed=self.sealer.seal(text, receiver), created_at=now,
            expires_at=float(cmd.expiration), dedupe_key=f"{cmd.id}|{receiver}",
        )
        queued = await self._store_and_submit(msg, text)
        if isinstance(queued, Duplicate):
            return _duplicate_response(name, cmd, queued)
        return await self._deliver(name, cmd, queued, wait, on_stored)

    async def _store_and_submit(
        self, msg: NewMessage, text: str, otp_row: NewOtp | None = None
    ) -> asyncio.Future[Result | None] | Duplicate:
        """Store the message, then hand it to the delivery engine, in a task of its
        own: a caller cancelled in between (aio-pika cancels its delivery tasks when
        the channel closes) must not leave a stored message that the engine never
        got. It would wait for the next restart, and the broker's redelivery of it
        would be answered as a duplicate."""

        async def run() -> asyncio.Future[Result | None] | Duplicate:
            inserted = await self.store.insert_message(msg, otp_row)
            if isinstance(inserted, Duplicate):
                return inserted
            job = Job(id=inserted.id, channel=msg.channel, receiver=msg.receiver,
                      subject=msg.subject, text=text, expires_at=msg.expires_at, attempts=0,
                      created_at=msg.created_at)
            return await self.engine.submit(job)

        return await asyncio.shield(run())

    async def _deliver(
        self,
        name: str,
        cmd: RequestOtp | SendSms | SendEmail | SendMessage | Handover,
        fut: asyncio.Future[Result | None],
        wait: float,
        on_stored: OnStored | None,
    ) -> Response:
        if on_stored is not None:
            await on_stored()
        try:
            result = await within(wait, asyncio.shield(fut)) if wait > 0 else None
        except TimeoutError:
            result = None
        data = _echo(cmd, None)
        if result is None:
            return Response(name, Code.PENDING, data, "accepted; delivery is still pending")
        return _result_response(name, data, result)

    # -- verification ------------------------------------------------------------
    async def _verify(self, name: str, cmd: VerifyOtp, client: str, ip: str | None) -> Response:
        receiver = self._receiver(cmd.receiver)
        now = self.clock()
        retry_after = await self.limiter.verify_blocked(receiver, now)
        if retry_after > 0:
            return _limited(name, cmd, retry_after, "too many wrong codes for this receiver")
        # Failures that count against no receiver count against the client (REST
        # user + address group, or the broker): guessing references stays throttled.
        client_key = f"{client}|{address_group(ip)}" if ip else client
        retry_after = await self.limiter.client_verify_blocked(client_key, now)
        if retry_after > 0:
            return _limited(name, cmd, retry_after, "too many failed verifications")
        checked: list[bool] = []  # set once the code of this receiver's OTP was checked

        def matches(record: OtpRecord) -> bool:
            if record.receiver != receiver:
                # Another receiver's OTP: raising leaves the record untouched (both
                # stores apply nothing when the check raises), so a stranger cannot
                # burn it nor count against its receiver.
                raise _OtherReceiver
            checked[:] = [True]
            return otp_matches(self.key, record.salt, record.digest, cmd.reference,
                               cmd.otp, receiver, cmd.params)

        try:
            outcome = await self.store.verify_otp(cmd.reference, now, matches,
                                                  self.otp.max_attempts)
        except _OtherReceiver:
            outcome = VerifyResult.UNKNOWN  # answered as a made-up reference: reveals nothing
        if outcome in (VerifyResult.WRONG, VerifyResult.BURNED) and checked:
            # A wrong code for this receiver's own OTP counts against the receiver.
            await self.limiter.verify_failed(receiver, now)
        elif outcome not in (VerifyResult.OK, VerifyResult.EXPIRED):
            # Made-up, used or burned references and another receiver's OTP never
            # count against the receiver (a stranger would lock it out): the client.
            await self.limiter.client_verify_failed(client_key, now)
        code, message = VERIFY_RESPONSES[outcome]
        return Response(name, code, _echo(cmd, None), message)

    async def _ussd(self, name: str, cmd: RequestUssd, grants: Grants, client: str) -> Response:
        # Checked before anything reaches a modem: a supplementary service code
        # (**21*<number># forwards every call) must never be sent.
        why = grants.ussd.refusal(cmd.ussd_code)
        if why is not None:
            log.warning("%s: refused a USSD code for modem %r: %s", client, cmd.modem_id, why)
            return Response(name, Code.INVALID_REQUEST, {}, f"data.ussd_code: {why}")
        sms = self.channels["sms"]
        ussd = getattr(sms, "ussd", None)
        if ussd is None or not sms.configured():
            return Response(name, Code.SERIAL_PORT_NULL, {}, "no SMS modem is configured")
        try:
            data: dict[str, Any] = await ussd(cmd.modem_id, cmd.ussd_code)
        except (LookupError, ValueError, OSError, TimeoutError) as exc:
            return Response(name, Code.FAILED, {}, f"USSD failed: {exc}")
        return Response(name, Code.SUCCESS, data)


class _OtherReceiver(Exception):
    """verify-otp named the reference of another receiver's OTP."""


def _grant_setting(client: str) -> str:
    """The configuration key granting more to ``client`` (``rest:alice``, ``amqp``), for
    grants handed in without one."""
    kind, _, user = client.partition(":")
    if kind == "rest" and user:
        return rest_grant_key(user)
    return f"{kind}.grants" if kind and kind != "-" else "grants"


def _echo(cmd: Command, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The request fields a client expects back (date_time always a number)."""
    data: dict[str, Any] = {}
    date_time = getattr(cmd, "date_time", None)
    data["date_time"] = date_time if date_time is not None else int(time.time())
    for key in ("receiver", "reference", "id"):
        value = getattr(cmd, key, None)
        if value:
            data[key] = value
    if extra:
        data.update(extra)
    return data


def _dedupe_key(cmd: Command, receiver: str) -> str | None:
    # Same id for the same receiver = the same message (e.g. published to two
    # brokers): send it once. request-otp is deduplicated by its reference.
    if isinstance(cmd, SendSms | SendEmail | SendMessage) and cmd.id:
        return f"{cmd.id}|{receiver}"
    return None


def _duplicate_response(name: str, cmd: Command, dup: Duplicate) -> Response:
    data = _echo(cmd, None)
    if dup.kind == "reference":
        return Response(name, Code.DUPLICATED, data, "reference already used")
    if dup.state is not None:
        data["status"] = dup.state
        data["first_response_code"] = dup.code or Code.PENDING.value
    return Response(name, Code.DUPLICATED, data, "message id already accepted")


def _limited(name: str, cmd: Command, retry_after: float, why: str) -> Response:
    seconds = max(1, math.ceil(retry_after))
    return Response(name, Code.RATE_LIMITED, _echo(cmd, {"retry_after": seconds}),
                    f"rate limited: {why}; retry after {seconds} s")


def _result_response(name: str, data: dict[str, Any], result: Result) -> Response:
    data = dict(data, status=result.state)
    if result.via:
        data["via"] = result.via
    return Response(name, result.code, data, result.reason if result.code != Code.SUCCESS else None)

