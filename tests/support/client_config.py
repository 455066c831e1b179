"""Configurations of the publisher library (``[client]`` and one method's table)
and of the daemon's matching broker table, for one topic."""

from __future__ import annotations

import textwrap

from tests.support.brokers import unique
from tests.support.daemon import API_PASSWORD, API_USER, phone_number
from tests.support.services import MQTT_HOST, MQTT_PORT, RABBIT_URL, REDIS_URL

# The ``otpd broker`` account both the daemon and the client use.
WS_USER, WS_PASSWORD = "app", "ws:secret"

# Test names of the methods: redis-stream is method redis in mode stream.
METHODS = ["rest", "amqp", "redis", "redis-stream", "mqtt", "ws"]


def _redis_mode(method: str) -> str:
    return "stream" if method == "redis-stream" else "pubsub"


def daemon_broker_block(method: str, topic: str, ws_port: int | None, extra: str = "") -> str:
    """The daemon's table consuming ``method`` on ``topic`` (nothing for REST)."""
    fast = "reconnect_min = 0.1\nreconnect_max = 0.5\n" + extra
    if method == "amqp":
        return f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\n{fast}'
    if method.startswith("redis"):
        return (f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\n'
                f'mode = "{_redis_mode(method)}"\n'
                f'consumer = "{unique("c")}"\nclaim_idle = 5\n{fast}')
    if method == "mqtt":
        return (f'[mqtt]\nhost = "{MQTT_HOST}"\nport = {MQTT_PORT}\ntopic = "{topic}"\n'
                f'client_id = "{unique("d")}"\n{fast}')
    if method == "ws":
        return (f'[ws]\nurl = "ws://127.0.0.1:{ws_port}/ws"\nusername = "{WS_USER}"\n'
                f'password = "{WS_PASSWORD}"\ntopic = "{topic}"\n{fast}')
    return ""


def client_toml(method: str, topic: str, *, rest_port: int | None = None,
                ws_port: int | None = None, client: str = "", extra: str = "") -> str:
    """A client configuration for ``method`` (test names: redis-stream = redis, mode stream)."""
    real = "redis" if method.startswith("redis") else method
    table = ""
    if method == "rest":
        table = (f'[rest]\nurl = "http://127.0.0.1:{rest_port}/api/otp"\n'
                 f'username = "{API_USER}"\npassword = "{API_PASSWORD}"\n')
    elif method == "amqp":
        table = f'[amqp]\nurl = "{RABBIT_URL}"\ntopic = "{topic}"\n'
    elif real == "redis":
        table = (f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{topic}"\n'
                 f'mode = "{_redis_mode(method)}"\n')
    elif method == "mqtt":
        table = f'[mqtt]\nhost = "{MQTT_HOST}"\nport = {MQTT_PORT}\ntopic = "{topic}"\n'
    elif method == "ws":
        table = (f'[ws]\nurl = "ws://127.0.0.1:{ws_port}/ws"\nusername = "{WS_USER}"\n'
                 f'password = "{WS_PASSWORD}"\ntopic = "{topic}"\n')
    head = (f'[client]\nmethod = "{real}"\ntimeout = 10\nconnect_timeout = 5\n'
            f"{textwrap.dedent(client)}\n")
    return head + table + textwrap.dedent(extra)


def phone() -> str:
    """A fresh Indonesian mobile number as an app writes it."""
    return phone_number()[0]


async def cleanup_topic(method: str, topic: str) -> None:
    """Remove what consuming ``method`` on ``topic`` left on the broker (best effort)."""
    try:
        if method == "amqp":
            import aio_pika

            conn = await aio_pika.connect(RABBIT_URL, timeout=5)
            async with conn:
                channel = await conn.channel()
                await channel.queue_delete(topic)
        elif method == "redis-stream":
            from redis.asyncio import Redis

            client = Redis.from_url(REDIS_URL)
            try:
                await client.delete(topic)
            finally:
                await client.aclose()
    except Exception as exc:
        print(f"cleanup of {topic} failed: {exc}")
