"""The modem driver against the simulator on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.channels.sms.at import Urc
from otpd.channels.sms.modem import AtTimeout, Modem, PinError, PortError, SendError, decode_ussd
from otpd.channels.sms.pdu import MessageTooLong
from otpd.channels.sms.profiles import PROFILES
from otpd.channels.sms.simulator import ModemSimulator
from tests.support.waiting import wait_until as eventually

from .conftest import fast_settings

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


# --- stored copies: storage full, lazy sweeps ---------------------------------------------


def stored(sim: ModemSimulator, *stats: int) -> list[int]:
    return sorted(i for i, item in sim.storage.items() if item.stat in stats)


async def test_storage_full_is_recovered_by_deleting_stored_copies(sims: Sims,
                                                                   modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True, capacity=6)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    unread = [sim.inject_incoming("+628111111111", f"customer {i}") for i in range(2)]
    for i in range(3):  # copies left behind (other software, or kept by the modem)
        sim.store_submit("+628122222222", f"old copy {i}")
    sim.store_submit("+628122222222", "never sent", stat=2)
    assert len(sim.storage) == sim.capacity
    before = len(sim.commands)
    await modem.send_sms(RECEIVER, "after the cleanup")
    assert [(m.receiver, m.text) for m in sim.sent] == [(RECEIVER, "after the cleanup")]
    cmgs = [c for c in sim.commands[before:] if c.startswith("AT+CMGS=")]
    assert len(cmgs) == 2  # the first was refused with +CMS ERROR: 322, the retry went out
    assert stored(sim, 0) == unread  # the customers' messages are kept, still unread
    assert stored(sim, 2) == []  # the STO UNSENT copy went too
    assert len(stored(sim, 3)) <= 1  # at most the copy of the message just sent


async def test_storage_full_of_unread_messages_is_a_transient_send_error(
        sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True, capacity=3)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    unread = [sim.inject_incoming("+628111111111", f"customer {i}") for i in range(3)]
    with pytest.raises(SendError) as refused:
        await modem.send_sms(RECEIVER, "no room")
    assert not refused.value.permanent and "322" in str(refused.value)  # another modem may
    assert sim.sent == [] and stored(sim, 0) == unread  # nothing received was deleted


async def test_storage_full_with_delete_sent_off_keeps_every_copy(sims: Sims,
                                                                  modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True, capacity=2)
    modem = modems(fast_settings("m1", sim.link, delete_sent=False))
    await modem.open()
    sim.store_submit("+628122222222", "kept 1")
    sim.store_submit("+628122222222", "kept 2")
    with pytest.raises(SendError, match="322"):
        await modem.send_sms(RECEIVER, "no room")
    assert len(sim.storage) == 2 and not any(c.startswith("AT+CMGD") for c in sim.commands)


@pytest.mark.parametrize("profile", ["generic", "wavecom"])  # AT+CPMS? with 3 / 2 storages
async def test_modem_keeping_copies_never_fills_up_and_is_swept_lazily(
        profile: str, sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True, capacity=10, profile=profile)
    sim.inject_incoming("+628111111111", "unread 1")
    modem = modems(fast_settings("m1", sim.link, max_parts=2))
    await modem.open()
    sim.inject_incoming("+628111111112", "unread 2")
    texts = [f"message {i} " + ("x" * 200 if i % 3 == 0 else "") for i in range(30)]
    parts = 0
    for text in texts:
        parts += len(await modem.send_sms(RECEIVER, text))
        assert len(sim.storage) <= sim.capacity - 1  # room left for what arrives meanwhile
    assert [m.text for m in sim.sent] == texts
    # Never refused: one AT+CMGS per part, no "memory full" retry.
    assert sum(c.startswith("AT+CMGS=") for c in sim.commands) == parts == 40
    sweeps = sum(c == "AT+CMGL=3" for c in sim.commands)
    assert 2 <= sweeps <= 10  # open + learning + a few when full, not one per message
    assert [s.stat for s in sim.storage.values()].count(0) == 2  # unread kept


async def test_modem_without_copies_is_swept_only_to_learn_that(sims: Sims,
                                                                modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")  # keeps no copy of what it sends
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    for i in range(12):
        await modem.send_sms(RECEIVER, f"code {i}")
    assert len(sim.sent) == 12
    # One sweep at open(), one after the first send: AT+CMGS is all the rest.
    assert sum(c == "AT+CMGL=3" for c in sim.commands) == 2
    assert not modem.sweep_due()
    await modem.open()  # reopened (maybe another modem now): learnt again
    await modem.send_sms(RECEIVER, "after reopen")
    assert sum(c == "AT+CMGL=3" for c in sim.commands) == 4


async def test_sweep_wanted_when_copies_are_left_for_idle_time(sims: Sims,
                                                               modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", store_sent=True, capacity=30)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    await modem.send_sms(RECEIVER, "first: swept at once, learns that copies are kept")
    assert stored(sim, 3) == [] and not modem.sweep_wanted.is_set()
    await modem.send_sms(RECEIVER, "second: copy left for later")
    assert len(stored(sim, 3)) == 1 and modem.sweep_wanted.is_set() and modem.sweep_due()
    idle_at = modem.idle_sweep_at(1.0)
    assert idle_at is not None and idle_at > asyncio.get_running_loop().time()
    assert await modem.cleanup_sent() == 1
    assert stored(sim, 3) == [] and not modem.sweep_due() and modem.idle_sweep_at(1.0) is None


# --- a modem that hangs in the middle of a send ----------------------------------------------


async def test_hang_after_the_pdu_times_out_and_the_modem_recovers(sims: Sims,
                                                                   modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link, send_timeout=0.3))
    await modem.open()
    long_text = "Part of a long message that hangs. " * 8  # 2 parts
    sim.set_fault("hang", after_parts=1)  # part 1 goes out, part 2 hangs after its PDU
    with pytest.raises(AtTimeout, match="no answer"):
        await modem.send_sms(RECEIVER, long_text)
    assert sum(c.startswith("AT+CMGS=") for c in sim.commands) == 2
    assert sim.sent == []  # the receiver never got a whole message
    assert not await modem.ping(0.2)
    sim.clear_fault()
    assert await modem.ping(0.5)
    await modem.send_sms(RECEIVER, long_text)
    assert [m.text for m in sim.sent] == [long_text] and sim.sent[0].parts == 2


# --- nothing in a text can become an AT command -----------------------------------------------

NASTY = [
    'a"b',
    "OTP 123456\r\nAT+CMGD=1,4\r\n",
    "x\x1aAT+CFUN=0\r",
    "\x1bAT+CPIN=\"0000\"\r\x1a",
    '"\r\n\x1a\x1b"',
    "\r" * 5 + "\n" * 5 + "\x1a\x1b" * 5,
    ('Kode "123456"\r\nAT+CMGS=20\r\x1a\x1b ' * 12),  # several parts, GSM 7-bit + UCS-2
    "😀\x1a\r\n" * 60,  # several UCS-2 parts
]


def nasty_texts(seed: int, count: int) -> list[str]:
    """Seeded random texts made mostly of what ends, aborts or quotes AT input."""
    rng = random.Random(seed)
    alphabet = ['"', "\r", "\n", "\x1a", "\x1b", "A", "T", "+", "=", ",", "0", "é", "😀", " "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
            for _ in range(count)]


@pytest.mark.parametrize("profile", ["generic", "huawei"])  # echo off; echo and URCs
async def test_text_can_never_inject_at_commands(profile: str, sims: Sims,
                                                 modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile=profile, urc_during_submit=True)
    modem = modems(fast_settings("m1", sim.link, delete_sent=False))
    await modem.open()
    if profile == "huawei":
        await modem.command("ATE1")  # the modem echoes every PDU back as well
    resets = sim.resets
    for text in NASTY + nasty_texts(7, 12):
        before = len(sim.commands)
        refs = await modem.send_sms(RECEIVER, text)
        new = sim.commands[before:]
        assert len(new) == len(refs)  # exactly one command per part, each an AT+CMGS
        assert all(re.fullmatch(r"AT\+CMGS=\d+", c) for c in new), new
        assert (sim.sent[-1].receiver, sim.sent[-1].text) == (RECEIVER, text)
        assert sim.sent[-1].parts == len(refs)
    assert sim.resets == resets and sim.storage == {} and sim.cmgf == 0  # no command ran
