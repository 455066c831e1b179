"""Operational commands need grants, through a real daemon: REST over real HTTP
and broker consumers the daemon started itself on a real broker, with the
modem simulator behind a pseudo-terminal recording every AT command it got.

The attack: any REST user or broker publisher ran any USSD code (``**21*<number>#``
forwards the SIM's calls) and read every SIM's IMSI and the modem's IMEI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otpd.auth.htpasswd import set_user
from otpd.channels.sms.simulator import ModemSimulator
from tests.support.daemon import (
    API_PASSWORD,
    API_USER,
    SMS_QUICK,
    Running,
    modem_table,
    modems_ready,
    start_daemon,
    write_config,
)
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer
from tests.support.services import MQTT_HOST, MQTT_PORT, require_tcp
from tests.transports.links import Link, MqttLink, RedisPubsubLink, running_node, start_node

OPS, ROOT, PASSWORD = "ops", "root-ops", "ops:pass"
FORWARD_ALL_CALLS = "**21*+15551234567#"
# Granted request-ussd and get-modem-list; ROOT also sees what identifies the SIM.
GRANTS = f"""
[server.grants]
{OPS} = ["request-ussd", "get-modem-list"]
{ROOT} = ["get-modem-list", "modem-identity"]
"""


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ModemSimulator]:
    s = ModemSimulator(tmp_path / "modem1", name="sim1", seed=1)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def run(tmp_path: Path, sim: ModemSimulator,
              session: aiohttp.ClientSession) -> AsyncIterator[Running]:
    config = write_config(tmp_path, modem_table("sim1", tmp_path / "modem1") + SMS_QUICK + GRANTS)
    for user in (OPS, ROOT):
        set_user(tmp_path / "users", user, PASSWORD, cost=4)
    started = await start_daemon(config, session)
    try:
        await modems_ready(started)
        yield started
    finally:
        await started.daemon.stop()


def ussd_sent(sim: ModemSimulator) -> list[str]:
    """The USSD commands the modem received."""
    return [c for c in sim.commands if c.upper().startswith("AT+CUSD")]


def keys_of(value: Any) -> set[str]:
    """Every key of every object in a JSON value."""
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


async def test_supplementary_service_codes_never_reach_the_modem(
        run: Running, sim: ModemSimulator) -> None:
    for code in (FORWARD_ALL_CALLS, "*21*15551234567#", "##002#", "*#06#", "#31#0812345#",
                 "*123*+628121234567#"):
        status, body = await run.client.call("request-ussd", {"modem_id": "sim1",
                                                              "ussd_code": code},
                                             user=OPS, password=PASSWORD)
        assert status == 200 and body["response_code"] == "1300", (code, body)
        assert body["message"].startswith("data.ussd_code:"), body
    assert ussd_sent(sim) == []
    # The same user's balance check does reach it: the recording above can see one.
    _, body = await run.client.call("request-ussd", {"modem_id": "sim1", "ussd_code": "*888#"},
                                    user=OPS, password=PASSWORD)
    assert body["response_code"] == "0000" and "Balance" in body["data"]["ussd_content"]
    assert len(ussd_sent(sim)) == 1 and "*888#" in ussd_sent(sim)[0]


async def test_ussd_without_the_grant_is_unauthorized(run: Running, sim: ModemSimulator) -> None:
    for user, password in ((API_USER, API_PASSWORD), (ROOT, PASSWORD)):
        status, body = await run.client.call("request-ussd", {"modem_id": "sim1",
                                                              "ussd_code": "*888#"},
                                             user=user, password=password)
        assert status == 200 and body["response_code"] == "1100", body
        assert "request-ussd" in body["message"]
        assert f"server.grants.{user}" in body["message"]
    assert ussd_sent(sim) == []


async def test_modem_list_needs_its_grant(run: Running, sim: ModemSimulator) -> None:
    _, body = await run.client.call("get-modem-list", {})
    assert body["response_code"] == "1100", body
    assert "get-modem-list" in body["message"] and "server.grants.app" in body["message"]
    assert sim.imsi not in json.dumps(body) and sim.profile.imei not in json.dumps(body)


async def test_modem_identity_needs_its_own_grant(run: Running, sim: ModemSimulator) -> None:
    imsi, imei = sim.imsi, sim.profile.imei
    _, body = await run.client.call("get-modem-list", {}, user=OPS, password=PASSWORD)
    assert body["response_code"] == "0000", body
    modem = body["data"]["modem_list"]["sim1"]
    assert modem["state"] == "ready" and modem["manufacturer"]
    assert not keys_of(body) & {"imsi", "imei", "iccid", "msisdn", "port"}, body
    assert imsi not in json.dumps(body) and imei not in json.dumps(body)

    _, body = await run.client.call("get-modem-list", {}, user=ROOT, password=PASSWORD)
    assert body["response_code"] == "0000", body
    modem = body["data"]["modem_list"]["sim1"]
    assert modem["imsi"] == imsi and modem["imei"] == imei and modem["port"]


LINKS: dict[str, tuple[Callable[[], Link], tuple[str, int]]] = {
    "redis-pubsub": (RedisPubsubLink, ("127.0.0.1", 6379)),
    "mqtt": (MqttLink, (MQTT_HOST, MQTT_PORT)),
}


@pytest.fixture(params=list(LINKS))
async def node(request: pytest.FixtureRequest, tmp_path: Path, smtp: SmtpServer,
               session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    """A daemon whose broker table has no grants key: the default grants."""
    make, service = LINKS[request.param]
    require_tcp(request.param, *service)
    link = make()
    async with running_node(tmp_path, link, smtp, session) as started:
        yield started


@pytest.mark.services
async def test_default_broker_consumer_refuses_operational_commands(node: Gateway) -> None:
    reply = await node.link.ask("request-ussd", {"modem_id": "sim1",
                                                 "ussd_code": FORWARD_ALL_CALLS})
    assert reply["command"] == "request-ussd" and reply["response_code"] == "1100", reply
    assert "request-ussd" in reply["message"] and ".grants" in reply["message"]
    reply = await node.link.ask("get-modem-list", {})
    assert reply["response_code"] == "1100", reply
    assert node.sim.imsi not in json.dumps(reply)
    assert ussd_sent(node.sim) == []
    # The default grants still cover the OTP, send and block commands.
    reply = await node.link.ask("echo", {"x": "y"})
    assert reply["response_code"] == "0000", reply


class GrantedRedisLink(RedisPubsubLink):
    """A Redis pub/sub consumer granted the modem list and one USSD code."""

    def table(self) -> str:
        return (super().table()
                + 'grants = ["get-modem-list", "request-ussd"]\nussd_allow = ["*888#"]\n')


@pytest.mark.services
async def test_broker_grants_and_ussd_allow_list(tmp_path: Path, smtp: SmtpServer,
                                                 session: aiohttp.ClientSession) -> None:
    require_tcp("redis", "127.0.0.1", 6379)
    link = GrantedRedisLink()
    await link.open()
    try:
        node = await start_node(tmp_path, link, smtp, session)
        try:
            reply = await link.ask("get-modem-list", {})
            assert reply["response_code"] == "0000", reply
            assert not keys_of(reply) & {"imsi", "imei", "iccid", "port"}, reply
            # *123# passes the built-in rule, but this table lists only *888#.
            reply = await link.ask("request-ussd", {"modem_id": "sim1", "ussd_code": "*123#"})
            assert reply["response_code"] == "1300", reply
            assert reply["message"].startswith("data.ussd_code:")
            assert ussd_sent(node.sim) == []
            reply = await link.ask("request-ussd", {"modem_id": "sim1", "ussd_code": "*888#"})
            assert reply["response_code"] == "0000", reply
            assert len(ussd_sent(node.sim)) == 1
        finally:
            await node.stop()
            await node.sim.stop()
    finally:
        await link.close()
