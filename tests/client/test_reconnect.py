"""A connection the broker drops is reopened on the next call (no manual reset)."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from otpd.broker import BrokerConfig, BrokerServer
from otpd.client.publishers.amqp import AmqpTransport
from otpd.client.publishers.mqtt import MqttTransport
from otpd.client.publishers.redis import RedisTransport
from otpd.client.publishers.ws import WsTransport
from tests.support.client_config import phone
from tests.support.gateway import MakeGateway
from tests.support.services import MQTT_HOST, MQTT_PORT
from tests.support.waiting import wait_until


async def test_mqtt_session_taken_over(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("mqtt")
    c = gw.client(client="wait_result = true")
    assert (await c.get_modem_list()).ok
    transport = c.transport
    assert isinstance(transport, MqttTransport) and transport._session is not None
    # Another client with the same id: the broker disconnects ours.
    session = transport._session
    intruder = mqtt.Client(CallbackAPIVersion.VERSION2,
                           client_id=session.client._client_id.decode())
    await asyncio.get_running_loop().run_in_executor(None, intruder.connect, MQTT_HOST,
                                                     MQTT_PORT)
    intruder.loop_start()
    try:
        await wait_until(lambda: session.lost, 5, "client disconnected by the broker")
        number = phone()
        assert (await c.send_sms(number, "after takeover", 60)).response_code == "0000"
        assert await gw.sms_text(number[1:]) == "after takeover"
    finally:
        intruder.disconnect()
        intruder.loop_stop()


async def test_redis_connection_killed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("redis")
    c = gw.client(client="wait_result = true")
    assert (await c.get_modem_list()).ok
    transport = c.transport
    assert isinstance(transport, RedisTransport) and transport._client is not None
    own = await transport._client.client_id()
    await transport._client.execute_command(  # type: ignore[no-untyped-call]
        "CLIENT", "KILL", "ID", own)
    number = phone()
    assert (await c.send_sms(number, "after kill", 60)).response_code == "0000"
    assert await gw.sms_text(number[1:]) == "after kill"


async def test_amqp_connection_closed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("amqp")
    c = gw.client(client="wait_result = true")
    assert (await c.get_modem_list()).ok
    transport = c.transport
    assert isinstance(transport, AmqpTransport) and transport._connection is not None
    await transport._connection.close()
    assert (await c.get_modem_list()).ok


async def test_ws_broker_restarted(make_gateway: MakeGateway) -> None:
    gw = await make_gateway("ws")
    c = gw.client(client="wait_result = true")
    assert (await c.get_modem_list()).ok
    assert isinstance(c.transport, WsTransport)
    # Restart the broker on the same port: every connection is closed.
    assert gw.broker is not None and gw.ws_port is not None
    await gw.broker.stop()
    gw.broker = BrokerServer(BrokerConfig(htpasswd=gw.broker.config.htpasswd, port=gw.ws_port))
    await gw.broker.start()
    await wait_until(lambda: all(x.connected for x in gw.run.daemon.consumers), 10,
                     "daemon reconnected")
    number = phone()
    assert (await c.send_sms(number, "after restart", 60)).response_code == "0000"
    assert await gw.sms_text(number[1:]) == "after restart"
