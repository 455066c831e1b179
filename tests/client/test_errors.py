"""Failures are clear and bounded: TransportError when the command could not be
delivered, ReplyTimeout (a TimeoutError) when nobody answered; never a hang."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from otpd.broker import BrokerServer
from otpd.client import AsyncOtpClient, ReplyTimeout, TransportError, parse_client_config
from tests.support.brokers import unique
from tests.support.client_config import WS_PASSWORD, WS_USER, cleanup_topic, client_toml, phone
from tests.support.daemon import free_port
from tests.support.gateway import MakeGateway
from tests.support.services import require_service


@pytest.fixture
async def clients() -> AsyncIterator[list[AsyncOtpClient]]:
    made: list[AsyncOtpClient] = []
    yield made
    for c in made:
        await c.close()


def make(made: list[AsyncOtpClient], toml: str) -> AsyncOtpClient:
    c = AsyncOtpClient(parse_client_config(toml))
    made.append(c)
    return c


@pytest.mark.parametrize("method", ["mqtt", "redis-stream", "ws"])
async def test_no_answer_is_a_reply_timeout(method: str, clients: list[AsyncOtpClient],
                                            broker: BrokerServer) -> None:
    """Published to a topic nobody consumes: ReplyTimeout after ``timeout``, not a hang."""
    await require_service(method)
    topic = unique("nobody")
    c = make(clients, client_toml(method, topic, ws_port=broker.port))
    started = time.monotonic()
    with pytest.raises(ReplyTimeout) as info:
        await c.verify_otp(phone(), "123456", "ref", timeout=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert isinstance(info.value, TimeoutError) and info.value.published
    assert info.value.command == "verify-otp" and "verify-otp" in str(info.value)
    assert (info.value.topic or "").startswith("otp-reply-")
    await cleanup_topic(method, topic)


async def test_redis_pubsub_without_subscriber_is_not_a_silent_loss(
        clients: list[AsyncOtpClient]) -> None:
    await require_service("redis")
    c = make(clients, client_toml("redis", unique("nobody")))
    with pytest.raises(TransportError, match="nobody is subscribed"):
        await c.send_sms(phone(), "lost?", 60)


async def test_amqp_without_queue_is_an_error(clients: list[AsyncOtpClient]) -> None:
    await require_service("amqp")
    c = make(clients, client_toml("amqp", unique("noqueue")))
    with pytest.raises(TransportError, match="has no queue"):
        await c.send_sms(phone(), "lost?", 60)
    # The client stays usable (the channel is not left broken).
    with pytest.raises(TransportError, match="has no queue"):
        await c.block_msisdn(phone())


@pytest.mark.parametrize("method", ["rest", "amqp", "redis", "mqtt", "ws"])
async def test_unreachable_server_is_a_transport_error(
        method: str, clients: list[AsyncOtpClient]) -> None:
    port = free_port()  # nothing listens there
    toml = client_toml(method, "sms", rest_port=port, ws_port=port)
    toml = (toml.replace("5672", str(port)).replace("6379", str(port))
            .replace("port = 1883", f"port = {port}"))
    c = make(clients, toml)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await c.send_sms(phone(), "x", 60)
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - started < 5
    assert "guest" not in str(info.value)  # no credentials in messages


async def test_wrong_credentials(make_gateway: MakeGateway, broker: BrokerServer,
                                 clients: list[AsyncOtpClient]) -> None:
    gw = await make_gateway("rest")
    # REST: the daemon's 401 carries a JSON answer: a response, not an exception.
    c = make(clients, gw.toml().replace('password = "', 'password = "wrong'))
    r = await c.send_sms(phone(), "x", 60)
    assert r.response_code == "1100" and not r.ok
    # WebSocket broker: the handshake is refused.
    toml = client_toml("ws", "sms", ws_port=broker.port).replace(
        f'password = "{WS_PASSWORD}"', 'password = "wrong"')
    assert WS_USER in toml
    c = make(clients, toml)
    with pytest.raises(TransportError, match="401"):
        await c.send_sms(phone(), "x", 60)
