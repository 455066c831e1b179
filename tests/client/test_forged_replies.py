"""Forged answers on a client's reply topic, against the real brokers and a
running daemon: whoever may publish on the broker can write to the topic a
``verify-otp`` names as its ``callback_topic``, before the daemon answers.

The daemon's replies are held back (its consumer's ``publish_reply`` is
wrapped) until the forger has published its frames and the client has
logged every one of them as ignored, so the forgeries always arrive first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from otpd.client import AsyncOtpClient, OtpResponse
from otpd.netutil import basic_authorization
from otpd.wire.brokers import STREAM_FIELD, topic_url
from otpd.wire.signing import sign_reply
from tests.support.brokers import unique
from tests.support.client_config import WS_PASSWORD, WS_USER, phone
from tests.support.gateway import Gateway, MakeGateway
from tests.support.services import RABBIT_URL, REDIS_URL
from tests.support.waiting import wait_until

KEY = "forged-replies-signing-key-0123456789"
# Not redis-stream: the daemon answers only on a stream it created, so a forger
# who writes first leaves the request unanswered (ReplyTimeout, never a forgery
# taken); its inbox reading every entry is tested in test_replies_from_a_stream.
BROKERS = ["redis", "mqtt", "ws", "amqp"]

Forge = Callable[[str, Any, list[bytes]], Awaitable[None]]


class Ignored(logging.Handler):
    """The reasons the client logged for every frame it ignored."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The client logs (command, topic, transport, reason).
        if "not the answer" in str(record.msg) and isinstance(record.args, tuple):
            self.reasons.append(str(record.args[-1]))


@pytest.fixture
def ignored() -> Iterator[Ignored]:
    handler = Ignored()
    logger = logging.getLogger("otpd.client")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # every ignored frame, not only the first (WARNING)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class Forgery:
    """Holds the daemon's next reply until ``frames`` are forged on its topic
    and the client has ignored them; keeps the daemon's genuine replies."""

    def __init__(self, gw: Gateway, forge: Forge, ignored: Ignored) -> None:
        self.forge, self.ignored = forge, ignored
        self.frames: list[bytes] = []
        self.expected = 0  # frames the client will have ignored once they are forged
        self.genuine: list[bytes] = []
        consumer = gw.consumer
        original = consumer.publish_reply

        async def gated(topic: str, body: bytes, correlation: bytes | str | None,
                        callback: bool) -> None:
            frames, self.frames = self.frames, []
            if frames:
                await self.forge(topic, correlation, frames)
                # A client that took a forgery stops reading: then this times
                # out, and the test sees what the client returned.
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: len(self.ignored.reasons) >= self.expected, 5,
                                     "the client to ignore the forged replies")
            self.genuine.append(body)
            await original(topic, body, correlation, callback)

        consumer.publish_reply = gated  # type: ignore[method-assign]

    def arm(self, frames: list[bytes]) -> None:
        """Forge ``frames`` before the daemon's next reply."""
        self.frames = frames
        self.expected = len(self.ignored.reasons) + len(frames)


@contextlib.asynccontextmanager
async def forger(method: str, gw: Gateway) -> AsyncIterator[Forge]:
    """An attacker's own broker connection publishing raw frames on a reply topic
    (AMQP: to the reply queue, with the request's correlation id)."""
    if method.startswith("redis"):
        from redis.asyncio import Redis

        redis = Redis.from_url(REDIS_URL)

        async def forge_redis(topic: str, _correlation: Any, frames: list[bytes]) -> None:
            for f in frames:
                if method == "redis-stream":
                    await redis.xadd(topic, {STREAM_FIELD: f})
                else:
                    assert await redis.publish(topic, f) == 1  # the client is listening

        try:
            yield forge_redis
        finally:
            await redis.aclose()
    elif method == "mqtt":
        from tests.support.mqtt_peer import Peer

        peer = await asyncio.to_thread(Peer().open)

        async def forge_mqtt(topic: str, _correlation: Any, frames: list[bytes]) -> None:
            for f in frames:
                assert await asyncio.to_thread(peer.publish, topic, f, 1)  # PUBACK-ed

        try:
            yield forge_mqtt
        finally:
            await asyncio.to_thread(peer.close)
    elif method == "ws":
        from websockets.asyncio.client import connect

        async def forge_ws(topic: str, _correlation: Any, frames: list[bytes]) -> None:
            url = topic_url(f"ws://127.0.0.1:{gw.ws_port}/ws", topic)
            headers = {"Authorization": basic_authorization(WS_USER, WS_PASSWORD)}
            async with connect(url, additional_headers=headers) as ws:
                for f in frames:
                    await ws.send(f.decode("utf-8"))

        yield forge_ws
    else:
        import aio_pika

        connection = await aio_pika.connect(RABBIT_URL, timeout=5)

        async def forge_amqp(queue: str, correlation: Any, frames: list[bytes]) -> None:
            channel = await connection.channel()
            cid = correlation.decode() if isinstance(correlation, bytes) else correlation
            for f in frames:
                await channel.default_exchange.publish(
                    aio_pika.Message(f, correlation_id=cid), routing_key=queue)
            await channel.close()

        try:
            yield forge_amqp
        finally:
            await connection.close()


def forged_success(receiver: str, reference: str, **top: Any) -> bytes:
    return json.dumps({"command": "verify-otp", "response_code": "0000",
                       "data": {"receiver": receiver, "reference": reference}, **top}).encode()


async def new_otp(gw: Gateway, client: AsyncOtpClient, receiver: str, reference: str) -> str:
    r = await client.create_otp(receiver, reference, 300, "Kode %s", wait_result=False)
    assert r.pending, r
    text = await gw.sms_text(receiver[1:])
    return text.removeprefix("Kode ")


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


@pytest.mark.parametrize("method", BROKERS)
async def test_forged_success_is_ignored_with_a_signing_key(
        method: str, make_gateway: MakeGateway, ignored: Ignored) -> None:
    """Needs the daemon to sign its replies (otpd.transports.consumer, sign_reply)."""
    gw = await make_gateway(method, f'require_signature = true\nsigning_key = "{KEY}"\n')
    client = gw.client(client=f'signing_key = "{KEY}"')
    number, reference = phone(), unique("ref")
    code = await new_otp(gw, client, number, reference)
    async with forger(method, gw) as forge:
        forgery = Forgery(gw, forge, ignored)
        forgery.arm([
            b'{"response_code":"0000"}',  # the attack as it was seen
            forged_success(number, reference),  # every field right, unsigned
            forged_success(number, reference, signature="0" * 64, in_reply_to=""),
            json.dumps(sign_reply(json.loads(forged_success(number, reference)), "",
                                  "the-attackers-own-key")).encode(),
        ])
        r = await client.verify_otp(number, wrong(code), reference)
        assert r.response_code == "1202" and not r.success, r  # the daemon's own answer
        assert ignored.reasons == ["answers another command", "signature: missing",
                                   "signature: does not match", "signature: does not match"]

        r = await client.verify_otp(number, code, reference)
        assert r.success, r  # the daemon's signed answer is taken
        captured = forgery.genuine[-1]
        assert json.loads(captured)["response_code"] == "0000"

        # A genuine success, replayed to another request with the same fields.
        forgery.arm([captured])
        r = await client.verify_otp(number, wrong(code), reference)
        assert r.response_code == "1202", r  # consumed by the right code
        assert ignored.reasons[-1] == "in_reply_to: answers another command"


@pytest.mark.parametrize("method", BROKERS)
async def test_without_a_key_answers_to_other_requests_and_junk_are_ignored(
        method: str, make_gateway: MakeGateway, ignored: Ignored) -> None:
    gw = await make_gateway(method)
    client = gw.client()
    number, reference = phone(), unique("ref")
    async with forger(method, gw) as forge:
        Forgery(gw, forge, ignored).arm([
            forged_success(number, unique("ref")),  # another reference
            forged_success(phone(), reference),  # another receiver
            json.dumps({"command": "send-sms", "response_code": "0000",
                        "data": {"receiver": number, "reference": reference}}).encode(),
            json.dumps({"command": "verify-otp", "response_code": "0000",
                        "data": {"receiver": number}}).encode(),
            b"not json", b"[1]", b'{"command":"verify-otp","data":{}}',
        ])
        r: OtpResponse = await client.verify_otp(number, "123456", reference)
    assert r.response_code == "1202" and r.data["reference"] == reference, r
    assert ignored.reasons == [
        "data.reference: not the request's", "data.receiver: not the request's",
        "answers another command", "data.reference: missing",
        "not JSON", "not a JSON object", "no response_code",
    ]


async def test_forger_reading_the_command_topic(make_gateway: MakeGateway,
                                                 ignored: Ignored) -> None:
    """The attack end to end on Redis pub/sub: a plain Redis client subscribed
    to the command channel learns the callback topic and the request's
    signature from the command itself and answers first."""
    from redis.asyncio import Redis

    gw = await make_gateway("redis", f'require_signature = true\nsigning_key = "{KEY}"\n')
    client = gw.client(client=f'signing_key = "{KEY}"')
    number, reference = phone(), unique("ref")
    code = await new_otp(gw, client, number, reference)
    spy, writer = Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)
    sniffed: list[dict[str, Any]] = []
    pubsub = spy.pubsub()
    try:
        await pubsub.subscribe(gw.topic)

        async def attack() -> None:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                command = json.loads(message["data"])
                sniffed.append(command)
                bound = {"in_reply_to": command["signature"]}
                for f in (forged_success(number, reference),
                          forged_success(number, reference, signature="f" * 64, **bound),
                          json.dumps(sign_reply(json.loads(forged_success(number, reference)),
                                                command["signature"], "guessed-key")).encode()):
                    await writer.publish(command["callback_topic"], f)
                return

        attacker = asyncio.create_task(attack())

        async def after_the_forgeries(_topic: str, _correlation: Any, _frames: list[bytes]
                                      ) -> None:
            await attacker

        forgery = Forgery(gw, after_the_forgeries, ignored)
        forgery.arm([b""] * 3)  # stand-ins for the attacker's three: wait until ignored
        r = await client.verify_otp(number, wrong(code), reference)
        assert r.response_code == "1202", r
        assert len(sniffed) == 1 and sniffed[0]["command"] == "verify-otp"
        assert ignored.reasons == ["signature: missing", "signature: does not match",
                                   "signature: does not match"]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await spy.aclose()
        await writer.aclose()


async def test_replies_from_a_stream_are_read_one_by_one(redis_url: str) -> None:
    """Redis stream mode: every entry in turn, forged ones first, across XREADs."""
    from redis.asyncio import Redis

    from otpd.client.config import RedisSettings
    from otpd.client.publishers.redis import RedisTransport

    topic = unique("otp-reply")
    transport = RedisTransport(RedisSettings(url=redis_url, topic=unique("cmd"), mode="stream"),
                               connect_timeout=1.0)
    writer = Redis.from_url(redis_url)
    try:
        async with transport.subscribe(topic) as inbox:
            for f in (b"junk-1", b"junk-2", b"answer"):
                await writer.xadd(topic, {STREAM_FIELD: f})
            assert [await inbox.receive() for _ in range(3)] == [b"junk-1", b"junk-2", b"answer"]
            # Waiting longer than redis-py's read timeout (connect_timeout, 1 s)
            # is several shorter XREADs, not a TimeoutError.
            late = asyncio.ensure_future(inbox.receive())
            done, _ = await asyncio.wait([late], timeout=1.3)
            assert not done
            await writer.xadd(topic, {STREAM_FIELD: b"later"})
            assert await late == b"later"
        assert not await writer.exists(topic)  # deleted on exit
    finally:
        await transport.close()
        await writer.aclose()
