"""The broker consumers a configuration asks for (outside the base class, so
that no consumer module imports its siblings). Client libraries are imported
only for the brokers configured."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from otpd.transports.consumer import Consumer
from otpd.transports.settings import BrokerSettings
from otpd.wire.reply_topics import ReplyTopicRules

if TYPE_CHECKING:
    from otpd.service import Service


def build_consumers(settings: BrokerSettings, service: Service, default_wait: float,
                    reserved_prefixes: Iterable[str] = ()) -> list[Consumer]:
    """One consumer per enabled broker table. ``reserved_prefixes``: key
    prefixes no reply may touch (the store's Redis prefix)."""
    consumers: list[Consumer] = []
    if settings.amqp is not None and settings.amqp.common.enabled:
        from otpd.transports.amqp import AmqpConsumer

        consumers.append(AmqpConsumer(settings.amqp, service, default_wait))
    if settings.redis is not None and settings.redis.common.enabled:
        from otpd.transports.redis import RedisConsumer

        consumers.append(RedisConsumer(settings.redis, service, default_wait))
    if settings.mqtt is not None and settings.mqtt.common.enabled:
        from otpd.transports.mqtt import MqttConsumer

        consumers.append(MqttConsumer(settings.mqtt, service, default_wait))
    if settings.ws is not None and settings.ws.common.enabled:
        from otpd.transports.ws import WsConsumer

        consumers.append(WsConsumer(settings.ws, service, default_wait))
    # Every broker's command topic, configured or not: a reply there would be
    # read back as a command by whichever consumer reads it.
    tables = (settings.amqp, settings.redis, settings.mqtt, settings.ws)
    rules = ReplyTopicRules.build((t.common.topic for t in tables if t is not None),
                                  reserved_prefixes)
    for consumer in consumers:
        consumer.reply_rules = rules
    return consumers
