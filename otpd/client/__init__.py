"""otpd's publisher library: OTP-Publisher's operations over REST, RabbitMQ,
Redis, MQTT or a WebSocket broker, chosen by configuration.

* :class:`AsyncOtpClient` (asyncio) and :class:`OtpClient` (blocking);
* :class:`OtpResponse`: ``response_code``, ``data``, ``message``, ``ok``;
* :func:`load_client_config` / :func:`parse_client_config` (TOML, see
  :mod:`otpd.client.config` for every key);
* errors: :class:`TransportError`, :class:`ReplyTimeout`, :class:`OtpStoreError`;
* ``otpd client ...`` on the command line (:mod:`otpd.client.cli`).
"""

from otpd.client.api import AsyncOtpClient
from otpd.client.config import (
    ClientConfig,
    ClientSettings,
    load_client_config,
    parse_client_config,
)
from otpd.client.errors import OtpClientError, OtpStoreError, ReplyTimeout, TransportError
from otpd.client.response import OtpResponse
from otpd.client.sync import OtpClient

__all__ = [
    "AsyncOtpClient",
    "ClientConfig",  # the old name of ClientSettings
    "ClientSettings",
    "OtpClient",
    "OtpClientError",
    "OtpResponse",
    "OtpStoreError",
    "ReplyTimeout",
    "TransportError",
    "load_client_config",
    "parse_client_config",
]
