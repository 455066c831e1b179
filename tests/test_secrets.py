"""No secret leaves its place: run every command with debug logging, then search
every log line, the database, its WAL and the outbox for the clear OTP codes,
the API and SMTP passwords and the SIM PIN. None may be found."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from otpd.channels.sms.simulator import ModemSimulator
from tests.support.daemon import API_PASSWORD, Client, free_port, write_config

SMTP_PASSWORD = "smtp-Pa55word-secret"
SIM_PIN = "4821"


class AuthSink:
    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.bodies.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"otp"
          and auth_data.password == SMTP_PASSWORD.encode())
    return AuthResult(success=ok)


async def test_no_secret_in_logs_or_store(tmp_path: Path) -> None:
    sink = AuthSink()
    smtp = Controller(sink, hostname="127.0.0.1", port=free_port(), authenticator=authenticator,
                      auth_require_tls=False)
    smtp.start()
    sim = ModemSimulator(tmp_path / "modem", name="sim", pin=SIM_PIN, seed=7)
    await sim.start()
    (tmp_path / "smtp.pass").write_text(SMTP_PASSWORD)
    port = free_port()
    config = write_config(tmp_path, f"""
        [[smtp]]
        name = "auth"
        host = "127.0.0.1"
        port = {smtp.port}
        username = "otp"
        password_file = "{tmp_path / 'smtp.pass'}"
        sender = "otp@example.com"

        [[modem]]
        name = "sim"
        port = "{tmp_path / 'modem'}"
        pin = "{SIM_PIN}"

        [log]
        level = "debug"

        [server.grants]
        app = ["get-modem-list"]
    """, rest_port=port)
    log = tmp_path / "otpd.log"
    with log.open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "otpd", "run", "--config", str(config)],
                                stdout=err, stderr=err)
    codes: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(session, f"http://127.0.0.1:{port}")
            for _ in range(100):
                try:
                    _, body = await client.call("get-modem-list", {})
                    if body["data"]["modem_list"]["sim"]["state"] == "ready":
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            calls: list[tuple[str, dict[str, Any]]] = [
                ("request-otp", {"receiver": "08121112222", "reference": "s1",
                                 "message": "Kode %s", "param1": "p"}),
                ("request-otp", {"receiver": "x@example.org", "reference": "s2",
                                 "message": "Your code: %s"}),
                ("send-sms", {"receiver": "08121112223", "message": "Your OTP is 918273"}),
                ("send-email", {"receiver": "y@example.org", "subject": "s",
                                "message": "Your OTP is 564738"}),
                ("send-message", {"receiver": "08121112224", "message": "OTP 102938"}),
                ("block-msisdn", {"receiver": "08121112225"}),
                ("unblock-msisdn", {"receiver": "08121112225"}),
                ("get-modem-list", {}),
                ("echo", {"x": "y"}),
            ]
            for command, data in calls:
                _, body = await client.call(command, data)
                assert body["response_code"] in ("0000", "1111"), (command, body)
            codes += [sim.sent[0].text.split()[-1], sink.bodies[0].split()[-1]]
            codes += ["918273", "564738", "102938"]
            for code, (receiver, ref) in zip(codes[:2], [("08121112222", "s1"),
                                                         ("x@example.org", "s2")], strict=True):
                _, body = await client.call("verify-otp", {"receiver": receiver, "reference": ref,
                                                           "otp": code, "param1": "p"
                                                           if ref == "s1" else ""})
                assert body["response_code"] == "0000"
            _, body = await client.call("verify-otp", {"receiver": "08121112222",
                                                       "reference": "s1", "otp": "000000"})
            # Wrong credentials are logged as a failure, never with the password.
            await client.call("echo", {}, password="wrong-" + API_PASSWORD)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await sim.stop()
        smtp.stop()
    assert all(len(c) >= 6 and c.isdigit() for c in codes), codes
    logged = log.read_bytes()
    # The search covered a log with every command in it, at debug level.
    for name in (b"request-otp", b"verify-otp", b"send-sms", b"send-email", b"send-message"):
        assert name in logged
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("otpd.db*"))
    assert stored  # the database, and its WAL if still there
    secrets = [*codes, API_PASSWORD, SMTP_PASSWORD, f'"{SIM_PIN}"', f"={SIM_PIN}",
               base64.b64encode(f"app:{API_PASSWORD}".encode()).decode()]
    for secret in secrets:
        assert secret.encode() not in logged, f"{secret!r} found in the log"
        assert secret.encode() not in stored, f"{secret!r} found in the store"
