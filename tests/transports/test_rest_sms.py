"""End to end with the real modem stack: REST -> service -> outbox -> pool -> AT over a
pseudo-terminal -> the modem simulator, which decodes the PDUs it receives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from otpd.channels.sms.simulator import ModemSimulator
from tests.support.daemon import (
    API_USER,
    SMS_QUICK,
    Running,
    modem_table,
    modems_ready,
    start_daemon,
    write_config,
)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ModemSimulator]:
    s = ModemSimulator(tmp_path / "modem1", name="sim1", seed=1, store_sent=True)
    await s.start()
    yield s
    await s.stop()


async def wait_ready(run: Running, count: int = 1) -> None:
    await modems_ready(run, count)


async def test_otp_by_sms_and_verify(tmp_path: Path, sim: ModemSimulator,
                                     session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, modem_table("sim1", tmp_path / "modem1") + SMS_QUICK)
    run = await start_daemon(config, session)
    try:
        await wait_ready(run)
        _, body = await run.client.call("request-otp", {
            "receiver": "08126666666", "reference": "r1", "message": "Kode OTP Anda %s",
            "param1": "100000"})
        assert body["response_code"] == "0000", body
        assert body["data"]["via"] == "sim1"
        assert len(sim.sent) == 1 and sim.sent[0].receiver == "+628126666666"
        code = sim.sent[0].text.removeprefix("Kode OTP Anda ")
        assert len(code) == 6 and code.isdigit()
        # The modem kept a stored copy of the sent message; otpd deleted it.
        assert not [s for s in sim.storage.values() if s.stat in (2, 3)]
        _, body = await run.client.call("verify-otp", {
            "receiver": "+62 812 6666 666", "reference": "r1", "otp": code, "param1": "100000"})
        assert body["response_code"] == "0000"
    finally:
        await run.daemon.stop()


async def test_long_unicode_sms_and_modem_list(tmp_path: Path, sim: ModemSimulator,
                                               session: aiohttp.ClientSession) -> None:
    grants = f'[server.grants]\n{API_USER} = ["get-modem-list", "request-ussd"]\n'
    config = write_config(tmp_path, modem_table("sim1", tmp_path / "modem1") + SMS_QUICK
                          + grants)
    run = await start_daemon(config, session)
    try:
        await wait_ready(run)
        text = "Kode verifikasi 😀 untuk transaksi Rp 100.000 — jangan bagikan. " * 3
        _, body = await run.client.call("send-sms", {"receiver": "+628121111111",
                                                     "message": text, "id": 1})
        assert body["response_code"] == "0000", body
        assert sim.sent[-1].text == text and sim.sent[-1].parts > 1
        _, body = await run.client.call("get-modem-list", {})
        modem = body["data"]["modem_list"]["sim1"]
        assert modem["sent"] == 1 and "pin" not in modem
        _, body = await run.client.call("request-ussd", {"modem_id": "sim1",
                                                         "ussd_code": "*888#"})
        assert body["response_code"] == "0000" and "Balance" in body["data"]["ussd_content"]
        _, body = await run.client.call("request-ussd", {"modem_id": "nope",
                                                         "ussd_code": "*888#"})
        assert body["response_code"] == "1102"
    finally:
        await run.daemon.stop()


async def test_failover_to_second_modem(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    bad = ModemSimulator(tmp_path / "m1", name="m1", seed=2)
    good = ModemSimulator(tmp_path / "m2", name="m2", seed=3)
    await bad.start()
    await good.start()
    config = write_config(tmp_path, modem_table("m1", tmp_path / "m1", '["0812"]')
                          + modem_table("m2", tmp_path / "m2", '["0899"]') + SMS_QUICK)
    run = await start_daemon(config, session)
    try:
        await wait_ready(run, 2)
        bad.set_fault("error", code=38)  # network out of order on the routed modem
        _, body = await run.client.call("send-sms", {"receiver": "08120000001", "message": "x"})
        assert body["response_code"] == "0000", body
        assert body["data"]["via"] == "m2"
        assert [m.receiver for m in good.sent] == ["+628120000001"] and not bad.sent
    finally:
        await run.daemon.stop()
        await bad.stop()
        await good.stop()


async def test_no_usable_modem_gives_1101_at_expiry(tmp_path: Path,
                                                    session: aiohttp.ClientSession) -> None:
    # Configured, but the port never appears.
    config = write_config(tmp_path, modem_table("ghost", tmp_path / "ghost") + SMS_QUICK)
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("send-sms", {
            "receiver": "08120000001", "message": "x", "expiration": int(time.time()) + 2})
        assert body["response_code"] == "1101", body
        _, body = await run.client.call("request-otp", {
            "receiver": "08120000001", "reference": "r9", "message": "%s",
            "expiration": int(time.time()) + 2})
        assert body["response_code"] == "1101"
    finally:
        await run.daemon.stop()


async def test_message_waits_for_a_modem_that_comes_back(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    sim = ModemSimulator(tmp_path / "late", name="late", seed=4)
    config = write_config(tmp_path, modem_table("late", tmp_path / "late") + SMS_QUICK, wait=0)
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("send-sms", {"receiver": "08120000002", "message": "hi"})
        assert body["response_code"] == "1111"  # durably queued
        await sim.start()  # the USB stick is plugged in
        for _ in range(100):
            if sim.sent:
                break
            await asyncio.sleep(0.1)
        assert [m.text for m in sim.sent] == ["hi"]
    finally:
        await run.daemon.stop()
        await sim.stop()


async def test_sim_daily_cap_moves_work_to_another_modem(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    a = ModemSimulator(tmp_path / "a", name="a", seed=5)
    b = ModemSimulator(tmp_path / "b", name="b", seed=6)
    await a.start()
    config = write_config(tmp_path, modem_table("a", tmp_path / "a", '["0812"]')
                          + modem_table("b", tmp_path / "b") + SMS_QUICK, wait=2, limits="""
        receiver_cooldown = 0
        sim_daily_max = 2
    """)
    run = await start_daemon(config, session)
    try:
        await wait_ready(run, 1)
        codes = []
        for i in range(3):
            _, body = await run.client.call("send-sms", {"receiver": f"0812000000{i}",
                                                         "message": f"m{i}"})
            codes.append(body["response_code"])
        assert codes == ["0000", "0000", "1111"]  # the SIM's cap: the third waits
        assert len(a.sent) == 2
        await b.start()  # a second modem (another SIM) takes the waiting message
        for _ in range(100):
            if b.sent:
                break
            await asyncio.sleep(0.1)
        assert [m.text for m in b.sent] == ["m2"] and len(a.sent) == 2
    finally:
        await run.daemon.stop()
        await a.stop()
        await b.stop()
    # The count is kept in the store: after a restart the capped SIM still waits.
    a = ModemSimulator(tmp_path / "a", name="a", seed=7)
    await a.start()
    run = await start_daemon(write_config(tmp_path, modem_table("a", tmp_path / "a")
                                          + SMS_QUICK, wait=1, limits="""
        receiver_cooldown = 0
        sim_daily_max = 2
    """), session)
    try:
        await wait_ready(run, 1)
        _, body = await run.client.call("send-sms", {"receiver": "08120000009", "message": "x"})
        assert body["response_code"] == "1111" and not a.sent
    finally:
        await run.daemon.stop()
        await a.stop()
