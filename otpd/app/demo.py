"""``otpd demo``: the real daemon with a simulated modem and a local mail sink.

Everything is real except the radio: the daemon talks AT commands over a
pseudo-terminal to otpd's modem simulator, and SMTP to a local aiosmtpd sink.
What the "phone" receives is printed, so a newcomer sees the whole flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import tempfile
import textwrap
from email import message_from_bytes
from pathlib import Path
from typing import Any

from otpd.app.daemon import Daemon
from otpd.app.settings import load_settings
from otpd.auth.htpasswd import set_user
from otpd.channels.sms.simulator import ModemSimulator

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # noqa: S105 - the demo's documented local credentials


class MailSink:
    """aiosmtpd handler: prints and keeps every email it receives."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        raw = bytes(envelope.content)
        (self.folder / f"{self.count:04d}.eml").write_bytes(raw)
        msg = message_from_bytes(raw)
        payload = msg.get_payload(decode=True)
        body = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        print(f"\n[mail sink] to {', '.join(envelope.rcpt_tos)} | {msg['Subject']}\n"
              f"            {body.strip()}", flush=True)
        return "250 Message accepted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_demo_config(state: Path, modem_link: Path, smtp_port: int, rest_port: int) -> Path:
    users = state / "users"
    set_user(users, DEMO_USER, DEMO_PASSWORD, cost=10)
    config = state / "otpd.toml"
    config.write_text(textwrap.dedent(f"""\
        # Written by `otpd demo`; see etc/otpd.example.toml for every key.
        [server]
        listen = "127.0.0.1:{rest_port}"
        users_file = "{users}"

        [server.grants]
        {DEMO_USER} = ["status-page"]  # the operator's page at /status

        [store]
        path = "{state / 'otpd.db'}"

        [otp]
        key_file = "{state / 'otp.key'}"
        country_code = "62"

        [delivery]
        wait = 20

        [control]
        socket = "{state / 'control.sock'}"

        [[modem]]
        name = "sim1"
        port = "{modem_link}"

        [[smtp]]
        name = "sink"
        host = "127.0.0.1"
        port = {smtp_port}
        security = "none"
        sender = "otpd demo <otp@demo.invalid>"
    """))
    return config


def _usage(port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    auth = f"-u {DEMO_USER}:{DEMO_PASSWORD}"
    otp = json.dumps({"command": "request-otp", "data": {
        "receiver": "08126666666", "reference": "tx-1001", "message": "Your OTP is %s",
        "param1": "100000"}})
    verify = json.dumps({"command": "verify-otp", "data": {
        "receiver": "08126666666", "reference": "tx-1001", "otp": "<code>",
        "param1": "100000"}})
    mail = json.dumps({"command": "send-email", "data": {
        "receiver": "someone@example.org", "subject": "Hello", "message": "Hi from otpd"}})
    return textwrap.dedent(f"""
        otpd demo is running: REST API on {base} (user {DEMO_USER}, password {DEMO_PASSWORD}).
        Try, in another terminal:

          curl -s {auth} {base}/api/otp -d '{otp}'
          curl -s {auth} {base}/api/otp -d '{verify}'
          curl -s {auth} {base}/api/email -d '{mail}'

        Status page (modems, outbox, chart; block and unblock): {base}/status

        SMS show up below as [simulated phone], emails as [mail sink]. Ctrl-C stops.
    """)


async def _print_sms(simulator: ModemSimulator) -> None:
    seen = 0
    while True:
        await asyncio.sleep(0.2)
        for sms in simulator.sent[seen:]:
            print(f"\n[simulated phone] SMS to {sms.receiver}: {sms.text}", flush=True)
        seen = len(simulator.sent)


async def run_demo(state_dir: Path | None, port: int) -> int:
    from aiosmtpd.controller import Controller

    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otpd-demo-")))
        else:
            state = state_dir
            state.mkdir(parents=True, exist_ok=True)
        (state / "mail").mkdir(exist_ok=True)
        link = state / "modem0"
        simulator = ModemSimulator(link, sent_log=state / "sms-sent.jsonl", delay=0.5)
        await simulator.start()
        smtp = Controller(MailSink(state / "mail"), hostname="127.0.0.1", port=_free_port())
        smtp.start()
        stack.callback(smtp.stop)
        settings = load_settings(write_demo_config(state, link, smtp.port, port))
        daemon = Daemon(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        printer = asyncio.create_task(_print_sms(simulator))
        try:
            await daemon.start()
            print(_usage(port), flush=True)
            await stop.wait()
        finally:
            printer.cancel()
            await daemon.stop()
            await simulator.stop()
    return 0
