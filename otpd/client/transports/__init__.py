"""Client transports, one per method; libraries are imported only for the one used."""

from __future__ import annotations

from otpd.client.config import ClientSettings
from otpd.client.transports.base import Inbox, Transport


def build_transport(config: ClientSettings) -> Transport:
    """The transport of ``config.method``."""
    timeout = config.connect_timeout
    match config.method:
        case "rest":
            from otpd.client.transports.rest import RestTransport

            return RestTransport(config.rest, timeout)
        case "amqp":
            from otpd.client.transports.amqp import AmqpTransport

            return AmqpTransport(config.amqp, timeout)
        case "redis":
            from otpd.client.transports.redis_broker import RedisTransport

            return RedisTransport(config.redis, timeout)
        case "mqtt":
            from otpd.client.transports.mqtt import MqttTransport

            return MqttTransport(config.mqtt, timeout)
        case "ws":
            from otpd.client.transports.websocket import WsTransport

            return WsTransport(config.ws, timeout)
    raise ValueError(f"unknown method {config.method!r}")


__all__ = ["Inbox", "Transport", "build_transport"]
