"""The asynchronous publisher API (OTP-Publisher's ``OTPPi`` class, in Python).

::

    async with AsyncOtpClient.from_file("/etc/otpd/client.toml") as otp:
        r = await otp.create_otp("08126666666", "tx-1001", 300, "Your OTP is %s",
                                 ["100000", "1234567890"])
        ...
        r = await otp.verify_otp("08126666666", "123456", "tx-1001", ["100000", "1234567890"])
        if r.success: ...

Every operation returns an :class:`OtpResponse`. Over REST the daemon always
answers. Over a broker, ``verify-otp`` and ``get-modem-list`` wait for the
daemon's answer on a reply topic of their own (the first message there that
answers this very command, signed by the daemon when ``signing_key`` is set:
see :mod:`otpd.client.replies`; others are ignored); ``request-otp``, ``send-*``
and ``block``/``unblock`` wait only with ``wait_result=True`` (or
``[client] wait_result = true``), else they return a local ``1111``
("published") once the broker has the command. A command the daemon would
refuse as malformed is refused here (``1300``) without being published.

:class:`~otpd.client.errors.TransportError` (not published) and
:class:`~otpd.client.errors.ReplyTimeout` (published, no answer in time) are
the only exceptions a well-formed call raises. One client may be used by
many tasks at once; it keeps its connection open until :meth:`close`.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from otpd.client.config import ClientSettings, load_client_config
from otpd.client.envelope import encode, envelope, normalise_params, param_fields
from otpd.client.errors import ReplyTimeout
from otpd.client.managed import Issued, ManagedOtps
from otpd.client.otpstore import OtpStore, open_store
from otpd.client.publishers import Transport, build_transport
from otpd.client.replies import ReplyCheck
from otpd.client.response import OtpResponse
from otpd.msisdn import mask
from otpd.settings_reader import ConfigError
from otpd.wire.brokers import reply_topic
from otpd.wire.codes import Code
from otpd.wire.protocol import ProtocolError, parse_object

log = logging.getLogger("otpd.client")

ParamsArg = Sequence[str | int]
Id = str | int | None


def _lifetime(lifetime: int) -> int:
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0:
        raise ValueError("lifetime must be a positive number of seconds (int)")
    return lifetime


def _id(value: Id) -> str | int:
    """The message id (the daemon sends one message per id and receiver)."""
    return uuid.uuid4().hex if value is None or value == "" else value


def _echo(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in ("date_time", "receiver", "reference", "id") if k in data}


class AsyncOtpClient:
    def __init__(self, config: ClientSettings, *, transport: Transport | None = None,
                 otp_store: OtpStore | None = None) -> None:
        self.config = config
        self.transport = transport or build_transport(config)
        self.managed: ManagedOtps | None = None
        m = config.manage_otp
        if m.enabled:
            if not m.secret_key:
                raise ConfigError(["manage_otp.secret_key: is required when enabled = true"])
            self.managed = ManagedOtps(m, otp_store or open_store(m, config.connect_timeout))

    @classmethod
    def from_file(cls, path: Path | str, method: str | None = None) -> AsyncOtpClient:
        return cls(load_client_config(path, method))

    async def __aenter__(self) -> AsyncOtpClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()
        if self.managed is not None:
            await self.managed.close()

    # -- operations ------------------------------------------------------------
    async def create_otp(self, receiver: str, reference: str | int, lifetime: int,
                         message_format: str, params: ParamsArg = (),
                         subject: str | None = None, id: Id = None, *,
                         wait_result: bool | None = None,
                         timeout: float | None = None) -> OtpResponse:
        """Send an OTP to ``receiver`` (SMS, or email when it has ``@``).

        ``message_format`` holds exactly one ``%s`` for the code (``%%`` is a
        percent sign); the OTP is bound to ``reference``, ``receiver`` and
        ``params`` (up to four strings, the same at verification) and expires
        ``lifetime`` seconds from now.
        """
        values = normalise_params(params)
        lifetime = _lifetime(lifetime)
        if self.managed is not None:
            return await self._create_managed(receiver, reference, lifetime, message_format,
                                              values, subject, id, wait_result, timeout)
        now = int(time.time())
        data: dict[str, Any] = {
            "date_time": now, "expiration": now + lifetime, "receiver": receiver,
            "message": message_format, "reference": reference, **param_fields(values),
        }
        if subject:
            data["subject"] = subject
        if id is not None and id != "":
            data["id"] = id
        return await self._call("request-otp", data, self._wait(wait_result), timeout)

    async def verify_otp(self, receiver: str, otp: str | int, reference: str | int,
                         params: ParamsArg = (), *,
                         timeout: float | None = None) -> OtpResponse:
        """Check a code: 0000 valid (and consumed), 1202 invalid, 1203 expired,
        1204 too many attempts."""
        values = normalise_params(params)
        if self.managed is not None:
            return await self.managed.verify(receiver, otp, reference, values)
        data: dict[str, Any] = {
            "date_time": int(time.time()), "receiver": receiver, "otp": otp,
            "reference": reference, **param_fields(values),
        }
        return await self._call("verify-otp", data, True, timeout)

    async def send_sms(self, receiver: str, message: str, lifetime: int, id: Id = None, *,
                       wait_result: bool | None = None,
                       timeout: float | None = None) -> OtpResponse:
        now = int(time.time())
        data = {"date_time": now, "expiration": now + _lifetime(lifetime), "id": _id(id),
                "receiver": receiver, "message": message}
        return await self._call("send-sms", data, self._wait(wait_result), timeout)

    async def send_email(self, receiver: str, subject: str, message: str, lifetime: int,
                         id: Id = None, *, wait_result: bool | None = None,
                         timeout: float | None = None) -> OtpResponse:
        now = int(time.time())
        data = {"date_time": now, "expiration": now + _lifetime(lifetime), "id": _id(id),
                "receiver": receiver, "subject": subject, "message": message}
        return await self._call("send-email", data, self._wait(wait_result), timeout)

    async def send_message(self, receiver: str, message: str, lifetime: int,
                           subject: str | None = None, id: Id = None, *,
                           wait_result: bool | None = None,
                           timeout: float | None = None) -> OtpResponse:
        """SMS, or email when ``receiver`` has ``@`` (``subject`` used then)."""
        now = int(time.time())
        data: dict[str, Any] = {"date_time": now, "expiration": now + _lifetime(lifetime),
                                "id": _id(id), "receiver": receiver, "message": message}
        if subject:
            data["subject"] = subject
        return await self._call("send-message", data, self._wait(wait_result), timeout)

    async def block_msisdn(self, receiver: str, *, wait_result: bool | None = None,
                           timeout: float | None = None) -> OtpResponse:
        data = {"date_time": int(time.time()), "receiver": receiver}
        return await self._call("block-msisdn", data, self._wait(wait_result), timeout)

    async def unblock_msisdn(self, receiver: str, *, wait_result: bool | None = None,
                             timeout: float | None = None) -> OtpResponse:
        data = {"date_time": int(time.time()), "receiver": receiver}
        return await self._call("unblock-msisdn", data, self._wait(wait_result), timeout)

    async def get_modem_list(self, *, timeout: float | None = None) -> OtpResponse:
        return await self._call("get-modem-list", {"date_time": int(time.time())}, True,
                                timeout)

    async def request(self, command: str, data: dict[str, Any], *, wait_result: bool = True,
                      timeout: float | None = None) -> OtpResponse:
        """Any command, as OTP-Publisher's ``request()`` (``date_time`` added if missing)."""
        data = {"date_time": int(time.time()), **data}
        return await self._call(command, data, wait_result, timeout)

    # -- internals -------------------------------------------------------------
    def _wait(self, wait_result: bool | None) -> bool:
        return self.config.wait_result if wait_result is None else wait_result

    async def _call(self, command: str, data: dict[str, Any], wait: bool,
                    timeout: float | None) -> OtpResponse:
        env = envelope(command, data)
        try:
            parse_object(env)  # the daemon's own validation: refuse here what it would refuse
        except ProtocolError as exc:
            return OtpResponse.local_answer(command, exc.code, _echo(data), exc.message)
        t = self.transport
        topic = reply_topic() if wait and not t.always_answers else None
        body = encode(env, callback_topic=topic if t.callback_in_envelope else None,
                      callback_delay=self.config.callback_delay,
                      signing_key=self.config.signing_key)
        receiver = data.get("receiver")
        log.debug("%s %s%s via %s", command, mask(receiver) if isinstance(receiver, str) else "",
                  " (waiting for the answer)" if topic else "", t.describe())
        accept: Callable[[bytes], OtpResponse]
        if t.always_answers:  # straight back over the connection: no one else can answer
            accept = functools.partial(OtpResponse.from_wire, command=command)
        else:  # anyone may write on the reply topic: only the daemon's answer will do
            accept = ReplyCheck.for_request(body, self.config.signing_key)
        answer = await t.request(body, topic, self.config.timeout if timeout is None else timeout,
                                 command, accept=accept)
        if answer is None:
            return OtpResponse.local_answer(command, Code.PENDING, _echo(data),
                                            "published; no result requested")
        return answer

    async def _create_managed(self, receiver: str, reference: str | int, lifetime: int,
                              message_format: str, params: tuple[str, str, str, str],
                              subject: str | None, id: Id, wait_result: bool | None,
                              timeout: float | None) -> OtpResponse:
        assert self.managed is not None
        issued = await self.managed.issue(receiver, reference, lifetime, message_format, params)
        if isinstance(issued, OtpResponse):
            return issued
        data: dict[str, Any] = {
            "date_time": issued.date_time, "expiration": issued.expiration, "id": _id(id),
            "receiver": receiver, "message": issued.text,
        }
        subject = subject or self.managed.config.subject
        if subject:
            data["subject"] = subject
        try:
            sent = await self._call("send-message", data, self._wait(wait_result), timeout)
        except ReplyTimeout:
            raise  # published: the code may still arrive, so the OTP stays valid
        except BaseException:
            await self._forget(issued)
            raise
        if not sent.ok:
            await self._forget(issued)  # refused: the message will never be sent
        answer = {"date_time": issued.date_time, "receiver": receiver,
                  "reference": issued.reference}
        answer.update({k: v for k, v in sent.data.items() if k in ("status", "via")})
        return OtpResponse("request-otp", sent.response_code, answer, sent.message,
                           local=sent.local)

    async def _forget(self, issued: Issued) -> None:
        assert self.managed is not None
        try:
            await self.managed.forget(issued)
        except Exception as exc:
            log.warning("could not remove the unsent OTP of reference %r: %s",
                        issued.reference, exc)
