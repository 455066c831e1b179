"""Modem faults, as a user of the REST API sees them: a modem that hangs in the
middle of a send, one that answers ``+CMS ERROR``, and one whose USB port
vanishes mid-send and comes back.

The daemon runs in-process with simulated modems on pseudo-terminals. The
first modem is routed the ``0812`` numbers, the second ``0899``; a message
that fails on its modem goes to the other one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otpd.channels.sms.simulator import ModemSimulator
from tests.faults.helpers import modem
from tests.support.daemon import API_USER, SMS_FAST, Running, start_daemon, write_config
from tests.support.mail import tag_of, tagged
from tests.support.waiting import wait_until

SEND_DELAY = 0.4  # s the simulated network takes per SMS: long enough to fault mid-send
# modems() reads get-modem-list, which the REST user needs granted.
GRANTS = f'[server.grants]\n{API_USER} = ["get-modem-list"]\n'


async def modems(run: Running) -> dict[str, dict[str, Any]]:
    _, body = await run.client.call("get-modem-list", {})
    assert body["response_code"] == "0000", body
    result: dict[str, dict[str, Any]] = body["data"]["modem_list"]
    return result


async def wait_state(run: Running, name: str, states: set[str], timeout: float = 15) -> None:
    async def reached() -> bool:
        return (await modems(run))[name]["state"] in states

    await wait_until(reached, timeout, f"modem {name} in {states}", interval=0.05)


def fault_mid_send(sim: ModemSimulator, act: Any, after: float = 0.15) -> None:
    """Call ``act()`` ``after`` s after the next AT+CMGS, i.e. once the PDU is typed
    and the simulated network is busy with it."""

    def on_command(line: str) -> None:
        if line.upper().startswith("AT+CMGS"):
            sim.on_command = None
            asyncio.get_running_loop().call_later(after, act)

    sim.on_command = on_command


def texts(sim: ModemSimulator) -> list[str]:
    return [tag_of(m.text) or "?" for m in sim.sent]


@pytest.fixture
async def pair(tmp_path: Path, session: aiohttp.ClientSession
               ) -> AsyncIterator[tuple[Running, ModemSimulator, ModemSimulator]]:
    m1 = ModemSimulator(tmp_path / "m1", name="m1", seed=1, delay=SEND_DELAY)
    m2 = ModemSimulator(tmp_path / "m2", name="m2", seed=2, delay=0.05)
    await m1.start()
    await m2.start()
    config = write_config(tmp_path, modem("m1", tmp_path / "m1", '["0812"]')
                          + modem("m2", tmp_path / "m2", '["0899"]') + SMS_FAST + GRANTS, wait=10)
    run = await start_daemon(config, session)
    try:
        await wait_state(run, "m1", {"ready"})
        await wait_state(run, "m2", {"ready"})
        yield run, m1, m2
    finally:
        await run.daemon.stop()
        await m1.stop()
        await m2.stop()


async def send(run: Running, tag: str, number: str = "08120000001") -> dict[str, Any]:
    _, body = await run.client.call("send-sms", {"receiver": number, "message": tagged(tag),
                                                 "id": tag})
    result: dict[str, Any] = body
    return result


async def test_modem_hanging_mid_send(
        pair: tuple[Running, ModemSimulator, ModemSimulator]) -> None:
    run, m1, m2 = pair
    fault_mid_send(m1, lambda: m1.set_fault("hang"))
    # Routed to m1, which goes silent with the PDU in hand: the send times out
    # and the other modem delivers it; the user just waits a little longer.
    body = await send(run, "hang-1")
    assert body["response_code"] == "0000", body
    assert body["data"]["via"] == "m2"
    assert texts(m2) == ["hang-1"] and texts(m1) == []
    # The hung modem is out of rotation: what would go to it goes to m2 at once.
    await wait_state(run, "m1", {"down", "starting"})
    for i in range(3):
        body = await send(run, f"hang-2-{i}")
        assert body["response_code"] == "0000" and body["data"]["via"] == "m2", body
    assert texts(m1) == []
    # The hung modem is probed; once it answers again it is back in rotation.
    m1.clear_fault()
    await wait_state(run, "m1", {"ready"})
    body = await send(run, "hang-3")
    assert body["response_code"] == "0000" and body["data"]["via"] == "m1", body
    # Each message went out exactly once.
    assert sorted(texts(m1) + texts(m2)) == sorted(
        ["hang-1", "hang-2-0", "hang-2-1", "hang-2-2", "hang-3"])


async def test_modem_answering_cms_error_fails_over(
        pair: tuple[Running, ModemSimulator, ModemSimulator]) -> None:
    run, m1, m2 = pair
    m1.set_fault("error", code=38)  # +CMS ERROR: 38, network out of order
    answers = await asyncio.gather(*(send(run, f"err-{i}") for i in range(5)))
    assert [a["response_code"] for a in answers] == ["0000"] * 5, answers
    assert {a["data"]["via"] for a in answers} == {"m2"}
    assert texts(m1) == [] and sorted(texts(m2)) == [f"err-{i}" for i in range(5)]
    m1.clear_fault()
    await wait_state(run, "m1", {"ready"})
    body = await send(run, "err-after")
    assert body["response_code"] == "0000" and body["data"]["via"] == "m1", body


async def test_modem_vanishing_mid_send_fails_over(
        pair: tuple[Running, ModemSimulator, ModemSimulator]) -> None:
    run, m1, m2 = pair
    fault_mid_send(m1, m1.vanish)  # the USB stick is pulled while it sends
    body = await send(run, "usb-1")
    assert body["response_code"] == "0000" and body["data"]["via"] == "m2", body
    await wait_state(run, "m1", {"down", "starting"})
    m1.reappear()
    await wait_state(run, "m1", {"ready"})
    body = await send(run, "usb-2")
    assert body["response_code"] == "0000" and body["data"]["via"] == "m1", body
    assert texts(m1) == ["usb-2"] and texts(m2) == ["usb-1"]


async def test_only_modem_vanishing_mid_send_delivers_after_it_returns(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    sim = ModemSimulator(tmp_path / "solo", name="solo", seed=3, delay=SEND_DELAY)
    await sim.start()
    config = write_config(tmp_path, modem("solo", tmp_path / "solo") + SMS_FAST + GRANTS, wait=0)
    run = await start_daemon(config, session)
    try:
        await wait_state(run, "solo", {"ready"})
        fault_mid_send(sim, sim.vanish)
        tags = [f"solo-{i}" for i in range(4)]
        for tag in tags[:2]:
            body = await send(run, tag)
            assert body["response_code"] == "1111", body  # durably queued
        await wait_until(lambda: not sim.present, 5, "the port to vanish")
        await wait_state(run, "solo", {"down", "starting"})
        # Accepted while the only modem is gone: queued, not refused.
        for tag in tags[2:]:
            body = await send(run, tag)
            assert body["response_code"] == "1111", body
        await asyncio.sleep(1.0)
        assert sim.sent == []
        sim.reappear()
        await wait_until(lambda: len(sim.sent) >= len(tags), 20, "the queued SMS")
        await asyncio.sleep(0.5)  # a duplicate would show by now
        assert sorted(texts(sim)) == tags  # each exactly once
        _, status = await run.client.call("send-sms", {"receiver": "08120000001",
                                                       "message": "x", "id": "solo-0"})
        assert status["response_code"] == "1201"
        assert status["data"]["status"] == "sent", status
    finally:
        await run.daemon.stop()
        await sim.stop()
