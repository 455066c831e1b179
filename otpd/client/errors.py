"""Exceptions of the publisher library.

A daemon's answer, whatever its code, is an :class:`~otpd.client.response.OtpResponse`,
never an exception. Exceptions mean the library could not get an answer:

* :class:`TransportError`: cannot connect, authenticate or publish; the command
  did not reach the broker / REST server (an ``OSError``: ``ConnectionError``).
* :class:`ReplyTimeout`: the command was handed over but no answer came
  within the timeout (a ``TimeoutError``). It may still be executed.
* :class:`OtpStoreError`: the local OTP store of ``manage_otp`` mode failed.

Configuration errors are :class:`otpd.settings_reader.ConfigError`, one line per key.
"""

from __future__ import annotations


class OtpClientError(Exception):
    """Base class of every error raised by :mod:`otpd.client`."""


class TransportError(OtpClientError, ConnectionError):
    """The command could not be delivered to the broker or REST server."""


class ReplyTimeout(OtpClientError, TimeoutError):
    """No answer within the timeout; the command was published and may still run."""

    def __init__(self, message: str, *, command: str = "", topic: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.topic = topic
        self.published = True


class OtpStoreError(OtpClientError):
    """The local OTP store (SQLite file or Redis) failed."""
