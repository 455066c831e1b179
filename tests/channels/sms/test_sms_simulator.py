"""The simulator on its own: the AT subset, storage, logs and faults (driven over the pty)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpd.aio import within
from otpd.channels.sms import pdu
from otpd.channels.sms.cli import add_parser
from otpd.channels.sms.modem import Modem
from otpd.channels.sms.simulator import ModemSimulator

from .conftest import fast_settings

Sims = Callable[..., Any]
Modems = Callable[..., Modem]


async def test_text_mode_write_store_send_list_delete(sims: Sims, modems: Modems,
                                                       tmp_path: Path) -> None:
    log = tmp_path / "sent.jsonl"
    sim: ModemSimulator = await sims("m1", sent_log=log)
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    await modem.command("AT+CMGF=1")
    await modem.command('AT+CSCS="GSM"')
    # Text mode AT+CMGS: the typed text is what gets sent.
    parser_reply = await modem.exchange('AT+CMGS="+628121234567"', pdu_hex="48656C6C6F")
    assert parser_reply.ok
    assert sim.sent[-1].text == "48656C6C6F" and sim.sent[-1].receiver == "+628121234567"
    await modem.command("AT+CMGF=0")
    (part,) = pdu.encode_submit("+628129999999", "stored then sent")
    written = await modem.exchange(f"AT+CMGW={part.tpdu_length}", pdu_hex=part.hex)
    index = int(written.prefixed("+CMGW:")[0])
    assert sim.storage[index].stat == 2
    sent = await modem.command(f"AT+CMSS={index}")
    assert sent.prefixed("+CMSS:") and sim.storage[index].stat == 3
    listed = await modem.command("AT+CMGL=4")
    assert listed.lines[0].startswith(f"+CMGL: {index},3,,{part.tpdu_length}")
    await modem.command(f"AT+CMGD={index}")
    assert sim.storage == {}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["text"] for r in records] == ["48656C6C6F", "stored then sent"]
    assert set(records[0]) == {"time", "receiver", "text", "parts", "modem"}
    assert records[1]["modem"] == "m1" and records[1]["parts"] == 1


async def test_errors_and_bad_pdu_length(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", profile="huawei")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open()
    assert (await modem.exchange("AT+NOPE")).final.text == "COMMAND NOT SUPPORT"
    (part,) = pdu.encode_submit("+628121234567", "x")
    reply = await modem.exchange(f"AT+CMGS={part.tpdu_length + 1}", pdu_hex=part.hex)
    assert reply.final.code == 304 and sim.sent == []
    assert (await modem.exchange("AT+CMGD=,9")).final.text == "ERROR"


async def test_delflags(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1")
    modem = modems(fast_settings("m1", sim.link, delete_sent=False))
    unread = sim.inject_incoming("+628111111111", "new")
    sim.store_submit("+628122222222", "sent copy", stat=3)
    sim.store_submit("+628122222222", "unsent copy", stat=2)
    await modem.open()
    await modem.command("AT+CMGD=1,2")  # read + sent
    assert sorted(s.stat for s in sim.storage.values()) == [0, 2]
    await modem.command("AT+CMGD=1,3")  # + unsent
    assert list(sim.storage) == [unread]
    await modem.command("AT+CMGD=1,4")
    assert sim.storage == {}


async def test_fail_rate_is_seeded_and_reproducible(sims: Sims, modems: Modems) -> None:
    outcomes: list[list[bool]] = []
    for run in range(2):
        sim: ModemSimulator = await sims(f"r{run}", fail_rate=0.5, seed=42)
        modem = modems(fast_settings(f"r{run}", sim.link))
        await modem.open()
        results = []
        for _ in range(8):
            (part,) = pdu.encode_submit("+628121234567", "x")
            reply = await modem.exchange(f"AT+CMGS={part.tpdu_length}", pdu_hex=part.hex)
            results.append(reply.ok)
        outcomes.append(results)
    assert outcomes[0] == outcomes[1]
    assert True in outcomes[0] and False in outcomes[0]


async def test_pin_lock_and_puk(sims: Sims, modems: Modems) -> None:
    sim: ModemSimulator = await sims("m1", pin="1111", profile="zte")
    modem = modems(fast_settings("m1", sim.link))
    await modem.open_port()  # raw exchanges, no initialisation
    assert not (await modem.exchange("ATZ")).ok  # Qualcomm/ZTE: nothing but CPIN while locked
    assert (await modem.exchange("AT+CPIN?")).prefixed("+CPIN:") == ["SIM PIN"]
    for _ in range(3):
        assert not (await modem.exchange('AT+CPIN="0000"')).ok
    assert sim.pin_attempts == 3
    assert (await modem.exchange("AT+CPIN?")).prefixed("+CPIN:") == ["SIM PUK"]


async def test_unknown_profile_and_fault() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        ModemSimulator(Path("/tmp/x"), profile="nokia3310")
    sim = ModemSimulator(Path("/tmp/x"))
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault("explode")
    with pytest.raises(ValueError, match="after_parts"):
        sim.set_fault("hang", after_parts=-1)


def test_cli_parsers() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="otpd")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["modem", "simulate", "--link", "/tmp/m", "--fail-rate", "0.2",
                              "--profile", "huawei", "--pin", "1234"])
    assert callable(args.func) and args.profile == "huawei" and args.fail_rate == 0.2
    args = parser.parse_args(["modem", "probe", "/dev/ttyUSB0", "--baud", "9600"])
    assert args.port == "/dev/ttyUSB0" and args.baud == 9600 and callable(args.func)
    assert callable(parser.parse_args(["modem", "list"]).func)


async def test_cli_simulate_and_probe_processes(tmp_path: Path) -> None:
    link = tmp_path / "cli-modem"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys; from otpd.channels.sms.cli import cmd_simulate, add_parser;"
        "import argparse; p = argparse.ArgumentParser(); add_parser(p.add_subparsers());"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
        "modem", "simulate", "--link", str(link), "--profile", "wavecom", "--pin", "1357",
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert sim.stdout is not None
        line = await within(10, sim.stdout.readline())
        assert b"simulated wavecom modem" in line
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from otpd.channels.sms.cli import add_parser;"
            "import argparse; p = argparse.ArgumentParser(); add_parser(p.add_subparsers());"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
            "modem", "probe", str(link), "--pin", "1357", "--timeout", "1",
            stdout=asyncio.subprocess.PIPE, env=env,
        )
        out, _ = await within(20, probe.communicate())
        assert probe.returncode == 0
        result = json.loads(out)
        assert result["manufacturer"] == "WAVECOM MODEM" and result["signal"]["csq"] == 18
    finally:
        sim.terminate()
        assert await within(10, sim.wait()) == 0
    assert not link.exists()  # cleaned up on SIGTERM
