"""A blocking wrapper around :class:`AsyncOtpClient`, for WSGI apps and scripts.

::

    with OtpClient.from_file("/etc/otpd/client.toml") as otp:
        r = otp.send_sms("08126666666", "Your code is 123456", 300)

The client runs its own event loop in a daemon thread (started on creation,
stopped by :meth:`close`), so connections stay open between calls and any
number of threads may call it at once. Do not call it from a coroutine: use
:class:`AsyncOtpClient` there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from otpd.client.api import AsyncOtpClient, Id, ParamsArg
from otpd.client.config import ClientSettings, load_client_config
from otpd.client.response import OtpResponse

T = TypeVar("T")

# Beyond the operation's own bounds: a stuck loop must not block the caller forever.
SAFETY_MARGIN = 30.0


class OtpClient:
    def __init__(self, config: ClientSettings, **kwargs: Any) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otpd-client",
                                        daemon=True)
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()

        async def make() -> AsyncOtpClient:
            return AsyncOtpClient(config, **kwargs)

        try:
            self._client = self._run(make(), None)
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_file(cls, path: Path | str, method: str | None = None) -> OtpClient:
        return cls(load_client_config(path, method))

    def __enter__(self) -> OtpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("OtpClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        bound = (self.config.timeout if timeout is None else timeout)
        try:
            return future.result(bound + self.config.connect_timeout * 3 + SAFETY_MARGIN)
        except TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._run(self._client.close(), 10.0)
            finally:
                self._closed = True
                self._stop_loop()

    # -- operations (see AsyncOtpClient) ---------------------------------------
    def create_otp(self, receiver: str, reference: str | int, lifetime: int,
                   message_format: str, params: ParamsArg = (), subject: str | None = None,
                   id: Id = None, *, wait_result: bool | None = None,
                   timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.create_otp(
            receiver, reference, lifetime, message_format, params, subject, id,
            wait_result=wait_result, timeout=timeout), timeout)

    def verify_otp(self, receiver: str, otp: str | int, reference: str | int,
                   params: ParamsArg = (), *, timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.verify_otp(receiver, otp, reference, params,
                                                 timeout=timeout), timeout)

    def send_sms(self, receiver: str, message: str, lifetime: int, id: Id = None, *,
                 wait_result: bool | None = None, timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.send_sms(receiver, message, lifetime, id,
                                               wait_result=wait_result, timeout=timeout),
                         timeout)

    def send_email(self, receiver: str, subject: str, message: str, lifetime: int,
                   id: Id = None, *, wait_result: bool | None = None,
                   timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.send_email(receiver, subject, message, lifetime, id,
                                                 wait_result=wait_result, timeout=timeout),
                         timeout)

    def send_message(self, receiver: str, message: str, lifetime: int,
                     subject: str | None = None, id: Id = None, *,
                     wait_result: bool | None = None,
                     timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.send_message(receiver, message, lifetime, subject, id,
                                                   wait_result=wait_result, timeout=timeout),
                         timeout)

    def block_msisdn(self, receiver: str, *, wait_result: bool | None = None,
                     timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.block_msisdn(receiver, wait_result=wait_result,
                                                   timeout=timeout), timeout)

    def unblock_msisdn(self, receiver: str, *, wait_result: bool | None = None,
                       timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.unblock_msisdn(receiver, wait_result=wait_result,
                                                     timeout=timeout), timeout)

    def get_modem_list(self, *, timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.get_modem_list(timeout=timeout), timeout)

    def request(self, command: str, data: dict[str, Any], *, wait_result: bool = True,
                timeout: float | None = None) -> OtpResponse:
        return self._run(self._client.request(command, data, wait_result=wait_result,
                                              timeout=timeout), timeout)
