"""Status events end to end: a daemon with a ``status_topic`` on the real Redis
and Mosquitto publishes the final delivery state of an SMS sent through the
modem simulator (whose network reports it delivered); signed in the event
domain when the table has a key, the receiver masked. Plus the rules the
topic must pass, and the consumer's bounded buffer while the broker is down."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from otpd.settings_reader import ConfigError
from otpd.transports.consumer import MAX_PENDING_EVENTS
from otpd.wire.signing import SignatureError, verify, verify_event, verify_reply
from tests.support.brokers import command, unique
from tests.support.daemon import load, phone_number, write_config
from tests.support.mail import SmtpServer
from tests.support.mqtt_peer import Peer
from tests.support.services import MQTT_HOST, MQTT_PORT, REDIS_URL, require_tcp
from tests.transports.links import MqttLink, RedisPubsubLink, running_node

pytestmark = pytest.mark.services

KEY = "a-signing-key-of-at-least-32-bytes-0123"


class RedisEventsLink(RedisPubsubLink):
    def __init__(self, extra: str) -> None:
        super().__init__()
        self.extra = extra

    def table(self) -> str:
        return super().table() + self.extra


def check_event(event: dict[str, Any], number: str, *, reference: str | None = None) -> None:
    assert event["event"] == "delivery" and event["state"] == "delivered"
    assert event["channel"] == "sms" and event["modem"] == "sim1"
    assert event["receiver"] == "+" + "*" * (len(number) - 4) + number[-3:]  # masked
    assert number[1:-3] not in json.dumps(event)
    assert isinstance(event["id"], int)
    assert event.get("reference") == reference
    now = time.time()
    assert now - 60 < event["sent_at"] <= event["reported_at"] <= now + 1
    assert isinstance(event["delivered_at"], int) and event["at"] >= event["sent_at"]


async def test_redis_subscriber_gets_the_signed_delivered_event(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    require_tcp("redis", "127.0.0.1", 6379)
    status = unique("status")
    link = RedisEventsLink(f'status_topic = "{status}"\nsigning_key = "{KEY}"\n')
    redis = Redis.from_url(REDIS_URL)
    pubsub = redis.pubsub()
    await pubsub.subscribe(status)
    try:
        async with running_node(tmp_path, link, smtp, session) as node:
            local, number = phone_number()
            reference = unique("ref")
            await link.publish(command("request-otp", {"receiver": local, "reference": reference,
                                                       "message": "Kode OTP %s"}))
            assert (await node.sms(number)).text
            message: Any = None
            async with asyncio.timeout(15):
                while message is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
            event = json.loads(message["data"])
            verify_event(event, KEY)
            # An event is neither a command nor a reply.
            with pytest.raises(SignatureError):
                verify(event, KEY)
            with pytest.raises(SignatureError):
                verify_reply(event, "", KEY)
            check_event(event, number, reference=reference)
            published = node.consumer.status()
            assert published["events_published"] == 1 and published["events_dropped"] == 0
            assert published["status_topic"] == status
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def test_mqtt_subscriber_gets_the_delivered_event(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    require_tcp("mqtt", MQTT_HOST, MQTT_PORT)
    status = unique("status")
    link = MqttLink(extra=f'status_topic = "{status}"\n')  # no key: unsigned
    peer = Peer().open()
    peer.subscribe(status)
    try:
        async with running_node(tmp_path, link, smtp, session) as node:
            local, number = phone_number()
            await link.publish(command("send-sms", {"id": 7, "receiver": local,
                                                    "message": "status event please"}))
            assert (await node.sms(number)).text == "status event please"
            event = json.loads((await peer.next(15)).payload)
            assert "signature" not in event
            check_event(event, number)
    finally:
        peer.close()


@pytest.mark.parametrize("topic, why", [
    ("otpd/+/x", "may hold only"),
    ("sms", "is a command topic"),
    ("a..b", "'..'"),
])
def test_status_topic_passes_the_reply_topic_rules(tmp_path: Path, topic: str, why: str) -> None:
    config = write_config(tmp_path, f'[redis]\nurl = "{REDIS_URL}"\ntopic = "sms"\n'
                                    f'status_topic = "{topic}"\n')
    with pytest.raises(ConfigError, match=f"redis.status_topic: .*{why}"):
        load(config)


async def test_status_topic_inside_the_store_prefix_stops_the_start(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    from otpd.app.daemon import Daemon
    from otpd.errors import StartupError

    config = write_config(tmp_path, f'[redis]\nurl = "{REDIS_URL}"\ntopic = "sms"\n'
                                    'status_topic = "otpd:events"\n')
    daemon = Daemon(load(config))
    try:
        with pytest.raises(StartupError, match=r"redis\.status_topic: 'otpd:events' is inside"):
            await daemon.start()
    finally:
        await daemon.stop()


async def test_events_while_the_broker_is_down_are_bounded_counted_and_dropped(
        tmp_path: Path) -> None:
    from otpd.transports.redis import RedisConsumer

    # A consumer that never connects (nothing listens there): events pile up to the bound.
    config = write_config(tmp_path, '[redis]\nurl = "redis://127.0.0.1:1/0"\n'
                                    'status_topic = "otpd-events"\n')
    settings = load(config)
    assert settings.brokers.redis is not None
    consumer = RedisConsumer(settings.brokers.redis, _NoService(), 1.0)  # type: ignore[arg-type]
    for n in range(MAX_PENDING_EVENTS + 5):
        consumer.publish_event({"event": "delivery", "id": n})
    st = consumer.status()
    assert st["events_pending"] == MAX_PENDING_EVENTS and st["events_dropped"] == 5
    assert st["events_published"] == 0


class _NoService:
    store = None
