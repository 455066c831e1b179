"""``otpd modem list|probe|simulate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from otpd.channels.sms.modem import (
    Modem,
    ModemError,
    PinError,
    Timing,
)
from otpd.channels.sms.profiles import PROFILES
from otpd.channels.sms.replies import signal_report
from otpd.channels.sms.settings import BAUD_RATES, ModemSettings
from otpd.channels.sms.simulator import ModemSimulator

_BY_ID = Path("/dev/serial/by-id")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    modem = subparsers.add_parser("modem", help="find, probe or simulate GSM modems")
    sub = modem.add_subparsers(dest="modem_command", required=True)

    p = sub.add_parser("list", help="scan serial ports and probe each for a modem")
    p.add_argument("--baud", type=int, default=115200, choices=BAUD_RATES)
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per AT command")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("probe", help="initialise one modem and print what it reports")
    p.add_argument("port")
    p.add_argument("--baud", type=int, default=115200, choices=BAUD_RATES)
    p.add_argument("--pin", default="", help="SIM PIN, entered once if the SIM asks")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per AT command")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("simulate", help="run a simulated modem on a pseudo-terminal")
    p.add_argument("--link", type=Path, required=True, help="symlink to create for the pty")
    p.add_argument("--delay", type=float, default=0.5, help="seconds per sent SMS part")
    p.add_argument("--fail-rate", type=float, default=0.0, help="0..1 share of failed sends")
    p.add_argument("--profile", default="generic", choices=sorted(PROFILES))
    p.add_argument("--sent-log", type=Path, default=None, help="JSON-lines file of sent SMS")
    p.add_argument("--pin", default="", help="SIM PIN the simulated SIM asks for")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible faults)")
    p.add_argument("--store-sent", action="store_true", help="keep a copy of each sent SMS")
    p.set_defaults(func=cmd_simulate)


def _describe(name: str, port: str, modem: Modem) -> dict[str, Any]:
    info = modem.info
    return {
        "name": name,
        "port": port,
        "manufacturer": info.manufacturer,
        "model": info.model,
        "revision": info.revision,
        "imei": info.imei,
        "imsi": info.imsi,
        "operator": info.operator,
        "signal": signal_report(info.csq),
        "registered": info.registered,
    }


async def probe(port: str, baud: int, pin: str, timeout: float) -> dict[str, Any]:
    """Open and initialise the modem on ``port`` (deleting nothing); what it reports."""
    settings = ModemSettings(
        name=Path(port).name, port=port, baud=baud, pin=pin, command_timeout=timeout,
        delete_sent=False,
    )
    modem = Modem(settings, timing=Timing(not_ready=10.0, cpin_grace=min(timeout, 2.0)))
    try:
        await modem.open()
        return _describe(settings.name, port, modem)
    finally:
        await modem.close()


def candidate_ports() -> list[str]:
    """Serial ports worth probing: stable by-id links first, then the rest."""
    from serial.tools import list_ports

    ports: list[str] = []
    seen: set[Path] = set()
    if _BY_ID.is_dir():
        for link in sorted(_BY_ID.iterdir()):
            ports.append(str(link))
            seen.add(link.resolve())
    for info in sorted(list_ports.comports(), key=lambda p: p.device):
        if Path(info.device).resolve() not in seen:
            ports.append(info.device)
    return ports


def cmd_list(args: argparse.Namespace) -> int:
    ports = candidate_ports()
    if not ports:
        print("no serial ports found")
        return 1
    found = 0
    for port in ports:
        try:
            result = asyncio.run(probe(port, args.baud, "", args.timeout))
        except PinError as exc:
            print(f"{port}: modem found, {exc}")
            found += 1
            continue
        except (ModemError, OSError) as exc:
            print(f"{port}: no modem ({exc})")
            continue
        found += 1
        sig = result["signal"]
        print(f"{port}: {result['manufacturer']} {result['model']} IMEI {result['imei']} "
              f"operator {result['operator'] or '-'} signal {sig['csq']} "
              f"({sig['rssi_dbm']} dBm, {sig['condition']}) "
              f"{'registered' if result['registered'] else 'not registered'}")
    return 0 if found else 1


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(probe(args.port, args.baud, args.pin, args.timeout))
    except (ModemError, OSError) as exc:
        print(f"{args.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


async def _simulate(args: argparse.Namespace) -> None:
    sim = ModemSimulator(
        args.link,
        sent_log=args.sent_log,
        delay=args.delay,
        fail_rate=args.fail_rate,
        profile=args.profile,
        pin=args.pin,
        seed=args.seed,
        store_sent=args.store_sent,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sim.start()
    print(f"simulated {args.profile} modem on {args.link}; Ctrl-C to stop", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        ModemSimulator(args.link, profile=args.profile, fail_rate=args.fail_rate)
    except ValueError as exc:
        print(f"otpd modem simulate: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_simulate(args))
    return 0
