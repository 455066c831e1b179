"""Relay: topic isolation, no echo, fan-out, OTP-Publisher's abrupt client,
oversize and binary frames, back-pressure and dead peers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from otpd.aio import within
from otpd.broker import BrokerServer
from otpd.broker.acl import Access
from otpd.broker.hub import Subscriber
from tests.support.waiting import wait_until

from .conftest import MakeBroker, RawClient, assert_silent, client, masked_frame, recv_text

COMMAND = json.dumps(
    {
        "command": "send-sms",
        "data": {"date_time": 1629685778, "id": 123456, "receiver": "0812", "message": "OTP 1"},
    }
)


async def test_topic_isolation_and_no_echo(broker: BrokerServer) -> None:
    async with (
        client(broker, topic="sms") as sender,
        client(broker, topic="sms", user="bob") as peer1,
        client(broker, topic="sms") as peer2,
        client(broker, topic="sms2") as other,
        client(broker, topic="SMS") as case_differs,
    ):
        await wait_until(lambda: broker.clients == 5)
        await sender.send(COMMAND)
        assert await recv_text(peer1) == COMMAND
        assert await recv_text(peer2) == COMMAND
        await assert_silent(sender)
        await assert_silent(other)
        await assert_silent(case_differs)
        # And the other way round: a reply on peer1 reaches sender and peer2 only.
        await peer1.send("reply")
        assert await recv_text(sender) == "reply"
        assert await recv_text(peer2) == "reply"
        await assert_silent(peer1)
        await assert_silent(other)


async def test_order_and_unicode_kept(broker: BrokerServer) -> None:
    texts = [f"{i} Ünïcødé ✓ 🚀" for i in range(200)]
    async with client(broker) as a, client(broker) as b:
        await wait_until(lambda: broker.clients == 2)
        for text in texts:
            await a.send(text)
        assert [await recv_text(b) for _ in texts] == texts


async def test_fanout_to_200_clients(make_broker: MakeBroker) -> None:
    n = 200
    # All from 127.0.0.1: above the default per-address cap.
    broker = await make_broker(max_connections=400, max_connections_per_address=400)
    clients = [client(broker, user=("alice", "bob")[i % 2]) for i in range(n)]
    conns: list[ClientConnection] = await asyncio.gather(*(c.__aenter__() for c in clients))
    try:
        await wait_until(lambda: broker.clients == n)
        await conns[0].send(COMMAND)
        received = await asyncio.gather(*(recv_text(ws) for ws in conns[1:]))
        assert received == [COMMAND] * (n - 1)
        await assert_silent(conns[0])
    finally:
        await asyncio.gather(*(c.__aexit__(None, None, None) for c in clients))
    await wait_until(lambda: broker.clients == 0)


async def test_otp_publisher_php_client(
    broker: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Raw `user:user` header, one masked frame, TCP close without close frame."""
    caplog.set_level(logging.DEBUG)
    async with client(broker, topic="sms") as consumer:
        await wait_until(lambda: broker.clients == 1)
        php = await RawClient.open(broker.port, "/ws/?topic=sms", "Basic kamshory:kamshory")
        assert php.status == 101
        await php.send_text(COMMAND)
        php.abort()
        assert await recv_text(consumer) == COMMAND
        await wait_until(lambda: broker.clients == 1)
    server_records = [r for r in caplog.records if r.name.startswith("otpd")]
    assert not [r for r in server_records if r.levelno >= logging.WARNING]
    assert not [r for r in server_records if r.exc_info]
    assert any("disconnect user='kamshory'" in r.getMessage() for r in server_records)
    # Message contents never reach the server's log, even at DEBUG.
    assert not any("OTP 1" in r.getMessage() for r in server_records)


async def test_frame_pipelined_behind_the_request(broker: BrokerServer) -> None:
    """A frame sent right behind the handshake request (before the 101 came
    back) is kept and relayed; then TCP is closed without a close frame."""
    async with client(broker, topic="sms") as consumer:
        await wait_until(lambda: broker.clients == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(
            b"GET /ws/?topic=sms HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Basic kamshory:kamshory\r\n\r\n"
            + masked_frame(b"pipelined")
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.close()
        assert await recv_text(consumer) == "pipelined"


async def test_oversize_frame_closes_1009(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_message=1024)
    async with client(broker) as big, client(broker) as peer:
        await wait_until(lambda: broker.clients == 2)
        await big.send("x" * 1024)  # at the limit: relayed
        assert len(await recv_text(peer)) == 1024
        await big.send("x" * 1025)
        with pytest.raises(ConnectionClosed) as info:
            await within(5, big.recv())
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        await assert_silent(peer)
        await wait_until(lambda: broker.clients == 1)


async def test_binary_frame_refused_1003(broker: BrokerServer) -> None:
    async with client(broker) as sender, client(broker) as peer:
        await wait_until(lambda: broker.clients == 2)
        await sender.send(b"\x00\x01binary")
        with pytest.raises(ConnectionClosed) as info:
            await within(5, sender.recv())
        assert info.value.rcvd is not None and info.value.rcvd.code == 1003
        await assert_silent(peer)


async def test_invalid_utf8_text_refused(broker: BrokerServer) -> None:
    async with client(broker) as peer:
        await wait_until(lambda: broker.clients == 1)
        raw = await RawClient.open(broker.port, "/ws?topic=sms", "Basic kamshory:kamshory")
        raw.writer.write(masked_frame(b"\xff\xfe bad"))
        await raw.wait_eof()
        await assert_silent(peer)


async def test_flood_does_not_stall_others_and_slow_client_dropped(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(queue_bytes=8 * 1024 * 1024, send_timeout=1.0)
    chunk = "x" * 4096
    count = 2000  # 8 MB: far beyond what the non-reading client's buffers hold
    async with (
        client(broker, topic="flood") as flooder,
        client(broker, topic="flood", max_size=None) as reader,
        client(broker, topic="quiet") as q1,
        client(broker, topic="quiet") as q2,
    ):
        slow = await RawClient.open(
            broker.port, "/ws?topic=flood", "Basic kamshory:kamshory", rcvbuf=4096
        )
        await wait_until(lambda: broker.clients == 5)

        async def flood() -> None:
            for i in range(count):
                await flooder.send(f"{i}:{chunk}")

        async def drain() -> list[int]:
            return [int((await recv_text(reader, 10)).split(":")[0]) for _ in range(count)]

        async def ping_pong() -> float:
            worst = 0.0
            for i in range(20):
                start = time.monotonic()
                await q1.send(f"ping {i}")
                assert await recv_text(q2) == f"ping {i}"
                worst = max(worst, time.monotonic() - start)
                await asyncio.sleep(0.02)
            return worst

        _, seen, worst = await asyncio.gather(flood(), drain(), ping_pong())
        assert seen == list(range(count))  # the reading client got everything, in order
        assert worst < 1.0  # the other topic kept flowing during the flood
        # The non-reading client was cut off (before it reads anything: reading
        # would make it a fast client again), and it sees its connection end.
        await wait_until(lambda: broker.clients == 4)
        await slow.wait_eof()
        slow.abort()
        assert not flooder.close_code and not reader.close_code


async def test_dead_peer_detected_by_ping(make_broker: MakeBroker) -> None:
    broker = await make_broker(ping_interval=0.2, ping_timeout=0.2, close_timeout=0.3)
    raw = await RawClient.open(broker.port, "/ws?topic=sms", "Basic kamshory:kamshory")
    assert raw.status == 101
    await wait_until(lambda: broker.clients == 1)
    # The raw client never answers pings: the broker gives up on it.
    await wait_until(lambda: broker.clients == 0, timeout=5)
    raw.abort()


async def test_stop_closes_clients_going_away(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    async with client(broker) as ws:
        await wait_until(lambda: broker.clients == 1)
        await broker.stop()
        with pytest.raises(ConnectionClosed) as info:
            await within(5, ws.recv())
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001


# -- outbox unit checks (no network) -------------------------------------------


class FakeWs:
    def __init__(self, block: bool = False) -> None:
        self.sent: list[bytes] = []
        self.aborted = False
        self.block = block
        self.buffered = 0  # bytes waiting in the (fake) socket write buffer
        self.transport = SimpleNamespace(
            abort=self._abort, get_write_buffer_size=lambda: self.buffered
        )

    def _abort(self) -> None:
        self.aborted = True

    async def send(self, data: bytes, text: bool = False) -> None:
        assert text
        if self.block:
            await asyncio.sleep(3600)
        self.sent.append(data)


def make_sub(ws: FakeWs, queue_bytes: int = 10, send_timeout: float = 5.0) -> Subscriber:
    return Subscriber(
        cast(Any, ws),
        user="u",
        topic="t",
        peer="p",
        queue_bytes=queue_bytes,
        send_timeout=send_timeout,
        access=Access(publish=True, subscribe=True),
    )


async def test_outbox_overflow_drops_client() -> None:
    ws = FakeWs()
    sub = make_sub(ws, queue_bytes=10)
    sub.offer(b"12345")
    sub.offer(b"12345")
    assert not ws.aborted
    sub.offer(b"1")
    assert ws.aborted and sub.drop_reason == "outgoing queue full"
    sub.offer(b"more")  # ignored once dropped
    await within(1, sub.run_writer())
    assert ws.sent == []


async def test_outbox_delivers_in_order() -> None:
    ws = FakeWs()
    sub = make_sub(ws, queue_bytes=100)
    task = asyncio.create_task(sub.run_writer())
    for i in range(5):
        sub.offer(str(i).encode())
    await wait_until(lambda: len(ws.sent) == 5)
    assert ws.sent == [b"0", b"1", b"2", b"3", b"4"]
    task.cancel()


async def test_stuck_send_drops_client() -> None:
    ws = FakeWs(block=True)
    sub = make_sub(ws, queue_bytes=100, send_timeout=0.05)
    sub.offer(b"x")
    await within(2, sub.run_writer())
    assert ws.aborted and sub.drop_reason is not None and "blocked" in sub.drop_reason


async def test_direct_write_only_when_nothing_is_queued() -> None:
    ws = FakeWs()
    sub = make_sub(ws, queue_bytes=100)
    assert sub.writable_now()
    ws.buffered = 10**6
    assert not sub.writable_now()  # socket buffer full: go through the outbox
    sub.offer(b"1")
    ws.buffered = 0
    assert not sub.writable_now()  # "1" is queued: a direct write would overtake it
    task = asyncio.create_task(sub.run_writer())
    await wait_until(lambda: ws.sent == [b"1"])
    assert sub.writable_now()
    task.cancel()


async def test_no_direct_write_while_writer_sends() -> None:
    ws = FakeWs(block=True)
    sub = make_sub(ws, queue_bytes=100, send_timeout=5.0)
    sub.offer(b"1")
    task = asyncio.create_task(sub.run_writer())
    await asyncio.sleep(0.01)
    assert not sub._items and not sub.writable_now()
    task.cancel()


async def test_idle_client_that_stopped_reading_is_dropped() -> None:
    ws = FakeWs()
    ws.buffered = 10**6  # output piled up earlier and never drains
    sub = make_sub(ws, queue_bytes=100, send_timeout=0.05)
    await within(2, sub.run_writer())
    assert ws.aborted and sub.drop_reason is not None and "not reading" in sub.drop_reason


async def test_idle_client_that_reads_is_kept() -> None:
    ws = FakeWs()
    sub = make_sub(ws, queue_bytes=100, send_timeout=0.02)
    task = asyncio.create_task(sub.run_writer())
    await asyncio.sleep(0.2)
    assert not ws.aborted and sub.drop_reason is None and not task.done()
    task.cancel()


async def test_stop_does_not_hang_on_client_that_does_not_read(make_broker: MakeBroker) -> None:
    broker = await make_broker(close_timeout=0.2, send_timeout=30.0, queue_bytes=16 << 20)
    async with client(broker, topic="t") as pub:
        slow = await RawClient.open(
            broker.port, "/ws?topic=t", "Basic kamshory:kamshory", rcvbuf=4096
        )
        await wait_until(lambda: broker.clients == 2)
        for _ in range(800):  # 6.4 MB: more than the kernel socket buffers hold
            await pub.send("y" * 8192)
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await within(5, broker.stop())
        assert time.monotonic() - start < 3
        slow.abort()
