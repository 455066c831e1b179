"""Client publishers, one per method (the client side of otpd.transports); libraries
are imported only for the one used."""

from __future__ import annotations

from otpd.client.config import ClientSettings
from otpd.client.publishers.base import Inbox, Transport


def build_transport(config: ClientSettings) -> Transport:
    """The transport of ``config.method``."""
    timeout = config.connect_timeout
    match config.method:
        case "rest":
            from otpd.client.publishers.rest import RestTransport

            return RestTransport(config.rest, timeout)
        case "amqp":
            from otpd.client.publishers.amqp import AmqpTransport

            return AmqpTransport(config.amqp, timeout)
        case "redis":
            from otpd.client.publishers.redis import RedisTransport

            return RedisTransport(config.redis, timeout)
        case "mqtt":
            from otpd.client.publishers.mqtt import MqttTransport

            return MqttTransport(config.mqtt, timeout)
        case "ws":
            from otpd.client.publishers.ws import WsTransport

            return WsTransport(config.ws, timeout)
    raise ValueError(f"unknown method {config.method!r}")


__all__ = ["Inbox", "Transport", "build_transport"]
