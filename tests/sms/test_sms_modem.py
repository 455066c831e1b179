"""The modem driver against the simulator on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.sms.at import Urc
from otpd.sms.modem import AtTimeout, Modem, PinError, PortError, SendError, decode_ussd
from otpd.sms.pdu import MessageTooLong
from otpd.sms.profiles import PROFILES
from otpd.sms.simulator import ModemSimulator

from .conftest import eventually, fast_settings

RECEIVER = "+628126666666"
Sims = Callable[..., Any]
Modems = Callable[..., Modem]

TEXTS = {
    "gsm7": "Your OTP is 123456. Valid for 5 minutes @ £5 ¥ è Δ",
    "extension": "Code {123456} [expires] ~5 min | €0.00 \\ ^",
    "ucs2": "Ваш код: 123456",
    "emoji": "Your code 😀 123456 👍🏽",
    "long_gsm7": "This is a long message that needs concatenation. " * 8,
    "long_emoji": "Kode OTP 123456 😀🎉 " * 8,
}


@pytest.mark.parametrize("name", sorted(TEXTS))
async def test_sends_exactly_the_text(name: str, sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    refs = await modem.send_sms(RECEIVER, TEXTS[name], validity=300)
    assert len(sim.sent) == 1
    assert (sim.sent[0].receiver, sim.sent[0].text) == (RECEIVER, TEXTS[name])
    assert sim.sent[0].parts == len(refs) and all(r > 0 for r in refs)
    assert (sim.sent[0].parts > 1) == name.startswith("long")


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_every_profile_initialises_and_sends(profile: str, sims: Sims,
                                                   modems: Modems) -> None:
    sim: ModemSimulator = await sims(profile, profile=profile, pin="1234",
                                     urc_during_submit=True, urc_interval=0.02)
    modem = modems(fast_settings(profile, sim.link, pin="1234"))
    await modem.open()
    assert modem.info.manufacturer == PROFILES[profile].manufacturer.strip()
    assert modem.info.imei == PROFILES[profile].imei  # also for SIM76xx '+CGSN: "..."'
    assert modem.info.registered is True and modem.info.csq == 18
    await modem.send_sms(RECEIVER, TEXTS["long_emoji"])
    assert [(m.receiver, m.text) for m in sim.sent] == [(RECEIVER, TEXTS["long_emoji"])]
    assert sim.pin_attempts == 1


async def test_echo_stays_harmless_when_atz_turns_it_back_on(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    await modem.exchange("ATE1")
    assert sim.echo
    reply = await modem.command("AT+CSQ")
    assert reply.lines == ("+CSQ: 18,99",)
    await modem.send_sms(RECEIVER, "echoed PDU")
    assert sim.sent[-1].text == "echoed PDU"


async def test_sent_copies_deleted_unread_incoming_kept(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True)
    unread = sim.inject_incoming("+628111111111", "hello from a customer")
    sim.store_submit("+628122222222", "left by other software", stat=2)  # STO UNSENT
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()  # the start-up cleanup removes the STO UNSENT copy
    assert set(sim.storage) == {unread}
    await modem.send_sms(RECEIVER, "a" * 300)  # two parts, two stored copies
    assert set(sim.storage) == {unread}
    assert sim.storage[unread].stat == 0  # still unread: cleanup never read it
    assert sum(c.startswith("AT+CMGD=") for c in sim.commands) == 3


async def test_keeps_copies_when_delete_sent_is_off(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True)
    modem = modems(fast_settings("m1", sim.link, delete_sent=False))
    await modem.open()
    await modem.send_sms(RECEIVER, "kept")
    assert [s.stat for s in sim.storage.values()] == [3]


async def test_read_incoming_marks_read_but_keeps(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile="huawei")  # storage numbered from 0
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    index = sim.inject_incoming("+628111111111", "Saldo Anda 5000")
    await eventually(modem.incoming_waiting.is_set, what="+CMTI")
    (item,) = await modem.read_incoming()
    assert (item.index, item.message.sender, item.message.text) == (
        index, "+628111111111", "Saldo Anda 5000")
    assert sim.storage[index].stat == 1
    assert await modem.read_incoming() == []


async def test_wrong_pin_is_tried_exactly_once(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", pin="1234")
    modem = modems(fast_settings("m1", sim.link, pin="9999"))
    with pytest.raises(PinError, match="rejected"):
        await modem.open()
    assert modem.pin_rejected
    with pytest.raises(PinError):
        await modem.open()  # refused before touching the SIM
    assert sim.pin_attempts == 1
    assert sum(c.startswith("AT+CPIN=") for c in sim.commands) == 1


async def test_missing_pin_is_failed_without_guessing(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", pin="1234")
    modem = modems(fast_settings("m1", sim.link))
    with pytest.raises(PinError, match="none is configured"):
        await modem.open()
    assert sim.pin_attempts == 0


async def test_sim_busy_window_is_waited_out(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile="zte", pin="4321", not_ready=0.4)
    modem = modems(fast_settings("m1", sim.link, pin="4321"))
    await modem.open()
    assert any(c == "AT+CMGF=0" for c in sim.commands)
    assert sim.commands.count("AT+CMGF=0") >= 2  # first answered +CME ERROR: 14
    await modem.send_sms(RECEIVER, "after busy")
    assert sim.sent[-1].text == "after busy"


async def test_smsc_unknown_is_fixed_by_rewriting_csca(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile="huawei", smsc_unwritten=True)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    await modem.send_sms(RECEIVER, "E220 quirk")
    assert sim.sent[-1].text == "E220 quirk"
    assert 'AT+CSCA="+6281100000",145' in sim.commands


async def test_send_errors_are_classified(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    sim.set_fault("error", code=42)  # congestion: another modem may do better
    with pytest.raises(SendError) as transient:
        await modem.send_sms(RECEIVER, "x")
    assert not transient.value.permanent and "42" in str(transient.value)
    sim.set_fault("error", code=1)  # unassigned number: nobody can send it
    with pytest.raises(SendError) as permanent:
        await modem.send_sms(RECEIVER, "x")
    assert permanent.value.permanent
    with pytest.raises(MessageTooLong):
        await modem.send_sms(RECEIVER, "a" * 2000)
    assert sim.sent == []


async def test_hang_times_out_and_ping_fails(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link, send_timeout=0.3, prompt_timeout=0.3))
    await modem.open()
    sim.set_fault("hang")
    with pytest.raises(AtTimeout, match="no prompt"):
        await modem.send_sms(RECEIVER, "x")
    assert not await modem.ping(0.2)
    sim.clear_fault()
    assert await modem.ping(0.5)
    await modem.send_sms(RECEIVER, "after hang")
    assert [m.text for m in sim.sent] == ["after hang"]


async def test_slow_submit_hits_the_send_timeout(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", delay=0.5)
    modem = modems(fast_settings("m1", sim.link, send_timeout=0.2))
    await modem.open()
    with pytest.raises(AtTimeout, match="no answer"):
        await modem.send_sms(RECEIVER, "slow")


async def test_vanish_and_reappear(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    troubles: list[str] = []
    modem = modems(fast_settings("m1", sim.link), on_trouble=troubles.append)
    await modem.open()
    sim.vanish()
    assert not sim.link.exists()
    await eventually(lambda: bool(troubles), what="loss noticed")
    assert not modem.is_open
    with pytest.raises(PortError):
        await modem.send_sms(RECEIVER, "x")
    with pytest.raises(PortError):
        await modem.open()
    sim.reappear()
    await modem.open()
    await modem.send_sms(RECEIVER, "back")
    assert [m.text for m in sim.sent] == ["back"]


async def test_urcs_update_state_and_reach_callback(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile="huawei", urc_interval=0.02)
    seen: list[Urc] = []
    modem = modems(fast_settings("m1", sim.link), on_urc=seen.append)
    await modem.open()
    sim.csq = 25
    await eventually(lambda: modem.info.csq == 25, what="^RSSI update")
    assert "^RSSI:25" in [u.line for u in seen]


async def test_ussd(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    raw = await modem.ussd("*888#", timeout=1.0)
    assert decode_ussd(raw) == ("Balance: 10000. Valid until 31-12-2030.", False)
    with pytest.raises(ValueError):
        await modem.ussd('*888#"\rATZ')


def test_decode_ussd_forms() -> None:
    assert decode_ussd('1,"Reply 1 for more",15') == ("Reply 1 for more", True)
    assert decode_ussd('0,"00480069",72') == ("Hi", False)
    assert decode_ussd("2") == ("", False)


async def test_port_that_never_existed(tmp_path: Path, modems: Modems) -> None:
    modem = modems(fast_settings("m1", tmp_path / "nothing"))
    with pytest.raises(PortError, match="cannot open"):
        await modem.open()


async def test_one_exchange_at_a_time(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", delay=0.05)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    results = await asyncio.gather(
        modem.send_sms(RECEIVER, "one"), modem.exchange("AT+CSQ"), modem.send_sms(RECEIVER, "two")
    )
    assert sorted(m.text for m in sim.sent) == ["one", "two"]
    assert results[1].lines == ("+CSQ: 18,99",)
