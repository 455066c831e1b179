"""Command line: run, demo, check-config, passwd, modem, broker."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otpd import __version__
from otpd.app.control import intake_lines
from otpd.app.logsetup import setup_logging
from otpd.app.settings import DEFAULT_CONFIG, Settings, load_settings
from otpd.settings_reader import ConfigError
from otpd.store.records import MESSAGE_STATES


def _add_config(p: argparse.ArgumentParser) -> None:
    default = Path(os.environ.get("OTPD_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--config", "-c", type=Path, default=default,
                   help=f"configuration file (default {DEFAULT_CONFIG}, or $OTPD_CONFIG)")


def _load(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{path}: configuration is not valid:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from otpd.app.daemon import Daemon, run_until_signalled
    from otpd.errors import StartupError

    settings = _load(args.config)
    if settings is None:
        return 2
    setup_logging(settings.log.level)
    try:
        asyncio.run(run_until_signalled(Daemon(settings)))
    except StartupError:
        return 1  # already logged, naming the key
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 2
    from otpd.app.config_warnings import config_warnings

    warnings = config_warnings(settings, args.config)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.config}: OK")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from otpd.auth.htpasswd import set_user

    users_file: Path
    if args.file is not None:
        users_file = args.file
    else:
        settings = _load(args.config)
        if settings is None:
            return 2
        users_file = settings.server.users_file
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"New password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ; nothing changed", file=sys.stderr)
            return 1
    # OTP-Publisher's WebSocket client sends the user name as the password, so
    # that one weak form is allowed on purpose; other short passwords are not.
    if len(password) < 8 and password != args.user:
        print("password must have at least 8 characters", file=sys.stderr)
        return 1
    try:
        added = set_user(users_file, args.user, password)
    except (ValueError, OSError) as exc:
        print(f"{users_file}: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if added else 'updated'} {args.user} in {users_file}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from otpd.app.demo import run_demo
    from otpd.errors import StartupError

    setup_logging("info")
    try:
        return asyncio.run(run_demo(args.dir, args.port))
    except StartupError as exc:
        print(f"otpd demo: {exc} (is another demo running? try --port)", file=sys.stderr)
        return 1


def _control_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    try:
        return load_settings(args.config).control.socket
    except ConfigError:
        from otpd.app.control import DEFAULT_SOCKET

        return DEFAULT_SOCKET


def _control(args: argparse.Namespace, message: dict[str, object]) -> dict[str, Any] | None:
    from otpd.app.control import request

    path = _control_path(args)
    try:
        answer = asyncio.run(request(path, message))
    except (OSError, TimeoutError, ValueError) as exc:
        print(f"cannot reach the daemon on {path}: {exc} (is otpd running? are you in the"
              " otpd group?)", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"error: {answer.get('error')}", file=sys.stderr)
        return None
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    answer = _control(args, {"op": "status"})
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    st, counts = answer["status"], answer["counts"]
    print(f"outbox: {st.get('pending', 0)} pending, oldest {st.get('oldest_pending_age', 0):.0f}"
          f" s; {counts.get('outbox_sent', 0)} sent, {counts.get('outbox_failed', 0)} failed,"
          f" {counts.get('outbox_expired', 0)} expired; {counts.get('blocked', 0)} blocked")
    if any(k.startswith("sms_") for k in counts):
        print(f"sms delivery: {counts.get('sms_delivered', 0)} delivered,"
              f" {counts.get('sms_undeliverable', 0)} undeliverable,"
              f" {counts.get('sms_unknown', 0)} unknown (no report in time),"
              f" {counts.get('sms_sent', 0)} awaiting a report")
    for m in st.get("channels", {}).get("sms", {}).get("modems", []):
        signal = m.get("signal") or {}
        print(f"modem {m.get('name')}: {m.get('state')} on {m.get('port')}, operator"
              f" {m.get('operator') or '?'}, signal {signal.get('rssi_dbm', '?')} dBm"
              f" ({signal.get('condition', '?')}), sent {m.get('sent', 0)},"
              f" failed {m.get('failed', 0)}, delivery reports {m.get('delivery_reports', '?')}"
              + _recent_delivery(m.get("delivery"), st)
              # Filtered (out of rotation) or flagged: why, with the numbers.
              + (f"; SIM {m['state_reason']}" if m.get("state_reason") else "")
              + (f", last error: {m['last_error']}" if m.get("last_error") else ""))
    for a in st.get("channels", {}).get("email", {}).get("accounts", []):
        print(smtp_status_line(a))
    for c in st.get("brokers", []):
        print(f"consumer {c['name']}: {'connected' if c['connected'] else 'disconnected'},"
              f" {c.get('received', 0)} received"
              + (f", last error: {c['last_error']}" if c.get("last_error") else ""))
    if st.get("intake"):
        for line in intake_lines(st):
            print(line)
    return 0


def smtp_status_line(a: dict[str, Any]) -> str:
    """``smtp primary: ok (smtp.example.com:587), sessions 2 busy + 1 idle of 4, sent
    today 1200/2000, 3 rests``, or ``resting 55 s: throttled: 421 ...``."""
    state = (f"resting {a.get('rest_left', 0):.0f} s: {a.get('rest_reason', '')}"
             if a.get("resting") else "ok" if a.get("healthy", True) else "failing")
    parts = [f"smtp {a['name']}: {state} ({a['host']}:{a['port']})"]
    sessions = a.get("sessions")
    if sessions:
        parts.append(f"sessions {sessions['busy']} busy + {sessions['idle']} idle of"
                     f" {sessions['max']}" + (", pipelining" if a.get("pipelining") else ""))
    if "sent" in a:
        day = a.get("sent_day")
        cap = a.get("max_per_day") or 0
        parts.append(f"sent {a['sent']} since start" + (
            f", today {day if day is not None else '?'}/{cap}" if cap else ""))
    if a.get("rests"):
        parts.append(f"{a['rests']} rests")
    if a.get("last_error") and not a.get("resting"):
        parts.append(f"last error: {a['last_error']}")
    return ", ".join(parts)


def _recent_delivery(counts: dict[str, Any] | None, st: dict[str, Any]) -> str:
    """``; SIM last 6 h: 9 delivered, 1 undeliverable, 0 unknown (90%)``, or ""."""
    if not counts or not counts.get("total"):
        return ""
    window = st.get("channels", {}).get("sms", {}).get("delivery_window", 0) / 3600
    ratio = counts.get("delivered_ratio")
    return (f"; SIM last {window:g} h: {counts.get('delivered', 0)} delivered,"
            f" {counts.get('undeliverable', 0)} undeliverable, {counts.get('unknown', 0)}"
            f" unknown" + (f" ({ratio:.0%})" if ratio is not None else ""))


def cmd_block(args: argparse.Namespace) -> int:
    answer = _control(args, {"op": args.command, "receiver": args.receiver})
    if answer is None:
        return 1
    done = "blocked" if args.command == "block" else (
        "unblocked" if answer.get("removed") else "was not blocked:")
    print(f"{done} {answer['receiver']}")
    return 0


def cmd_blocklist(args: argparse.Namespace) -> int:
    answer = _control(args, {"op": "blocklist"})
    if answer is None:
        return 1
    for receiver in answer["blocked"]:
        print(receiver)
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    states = args.state or ["pending", "failed", "expired"]
    answer = _control(args, {"op": "outbox", "states": states, "limit": args.limit})
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer["messages"], indent=2))
        return 0
    for m in answer["messages"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"]))
        state = m["state"] + (f"/{m['delivery']}" if m.get("delivery") else "")
        print(f"{m['id']:>8} {when} {m['command']:<13} {m['receiver']:<22} {state:<22}"
              f" {m['code'] or '':<5} attempts {m['attempts']}"
              + (f" via {m['via']}" if m.get("via") else "")
              + (f": {m['reason']}" if m.get("reason") else ""))
    return 0


def _add_control(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--socket", help="control socket (default: control.socket of the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"otpd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    _add_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("passwd", help="add or change a REST API user (bcrypt)")
    p.add_argument("user")
    _add_config(p)
    p.add_argument("--users-file", "--file", dest="file", type=Path,
                   help="users file (default: server.users_file of the config)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_passwd)

    p = sub.add_parser("demo", help="run with a simulated modem and a local mail sink")
    p.add_argument("--dir", type=Path, default=None, help="state directory (default: temporary)")
    p.add_argument("--port", type=int, default=8899, help="REST port (default 8899)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="modems, consumers and outbox of the running daemon")
    _add_control(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for name, text in (("block", "block a number or address"),
                       ("unblock", "unblock a number or address")):
        p = sub.add_parser(name, help=text)
        p.add_argument("receiver")
        _add_control(p)
        p.set_defaults(func=cmd_block)

    p = sub.add_parser("blocklist", help="list blocked numbers and addresses")
    _add_control(p)
    p.set_defaults(func=cmd_blocklist)

    p = sub.add_parser("outbox", help="pending and failed messages (receivers masked);"
                       " sent SMS show their delivery: sent/delivered, /undeliverable, /unknown")
    _add_control(p)
    p.add_argument("--state", action="append",
                   choices=list(MESSAGE_STATES),
                   help="repeat for several (default: pending, failed, expired)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_outbox)

    from otpd.broker.cli import add_parser as add_broker
    from otpd.channels.sms.cli import add_parser as add_modem
    from otpd.client.cli import add_parser as add_client

    add_modem(sub)
    add_broker(sub)
    add_client(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
