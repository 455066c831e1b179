"""Operating the daemon: /healthz, /readyz, /metrics (parsed with prometheus-client),
the control socket behind `otpd status/block/outbox`, SIGHUP reload, and HTTPS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from otpd.auth.htpasswd import set_user
from tests.support.daemon import (
    API_PASSWORD,
    API_USER,
    Client,
    free_port,
    start_daemon,
    write_config,
)
from tests.support.mail import SmtpServer


def otpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otpd", *args], capture_output=True,
                          text=True, timeout=60)


async def test_health_ready_and_metrics(tmp_path: Path, smtp: SmtpServer,
                                        session: aiohttp.ClientSession) -> None:
    run = await start_daemon(write_config(tmp_path, smtp_port=smtp.port), session)
    base = run.client.base
    try:
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with session.get(base + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["ready"] and body["store_writable"]
            assert body["channels_usable"] == {"email": True}
        _, out = await run.client.call("request-otp", {
            "receiver": "m@example.org", "reference": "r1", "message": "%s"})
        assert out["response_code"] == "0000"
        await run.client.call("verify-otp", {"receiver": "m@example.org", "reference": "r1",
                                             "otp": "x"})
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 401  # metrics require auth by default
        token = base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()
        async with session.get(base + "/metrics",
                               headers={"Authorization": f"Basic {token}"}) as resp:
            assert resp.status == 200
            text = await resp.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("otpd_otp_events_total", (("event", "created"),))] == 1
        assert samples[("otpd_otp_events_total", (("event", "failed"),))] == 1
        assert samples[("otpd_rest_requests_total", (("code", "0000"), ("status", "200")))] == 1
        assert samples[("otpd_outbox_pending", (("channel", "email"),))] == 0
        assert ("otpd_delivery_seconds_count", (("channel", "email"),)) in samples
        assert ("otpd_rest_request_seconds_bucket",
                (("command", "request-otp"), ("le", "0.1"))) in samples
    finally:
        await run.daemon.stop()


async def test_not_ready_without_a_usable_channel(tmp_path: Path,
                                                  session: aiohttp.ClientSession) -> None:
    dead = free_port()
    config = write_config(tmp_path, smtp_port=dead)
    run = await start_daemon(config, session)
    try:
        # SMTP configured (usable as far as we know) but no modem: still ready.
        async with session.get(run.client.base + "/readyz") as resp:
            assert resp.status == 200
    finally:
        await run.daemon.stop()
    bare = tmp_path / "no-channels"
    bare.mkdir()
    run = await start_daemon(write_config(bare), session)
    try:
        async with session.get(run.client.base + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["ready"] is False  # nothing can send
    finally:
        await run.daemon.stop()


async def test_operator_cli_through_the_control_socket(tmp_path: Path, smtp: SmtpServer,
                                                       session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port)
    run = await start_daemon(config, session)
    try:
        out = await asyncio.to_thread(otpd, "block", "0812-1111-222", "--config", str(config))
        assert out.returncode == 0 and "+628121111222" in out.stdout
        _, body = await run.client.call("send-sms", {"receiver": "+628121111222",
                                                     "message": "m"})
        assert body["response_code"] == "1400"
        out = await asyncio.to_thread(otpd, "blocklist", "--config", str(config))
        assert out.stdout.split() == ["+628121111222"]
        await run.client.call("send-email", {"receiver": "x@example.org", "subject": "s",
                                             "message": "secret text 4242"})
        out = await asyncio.to_thread(otpd, "outbox", "--state", "sent", "--config", str(config))
        assert "send-email" in out.stdout and "x***@example.org" in out.stdout
        assert "4242" not in out.stdout and "x@example.org" not in out.stdout
        control = run.daemon.control
        assert control is not None
        for states in (["pending"] * 5, ["sent", "bogus"], "sent", [7]):
            answer = await control.handle(json.dumps({"op": "outbox", "states": states}).encode())
            assert answer["ok"] is False and "states" in answer["error"], states
        answer = await control.handle(b'{"op": "outbox", "states": ["sent", "sent"]}')
        assert answer["ok"] is True and len(answer["messages"]) == 1
        answer = await control.handle(b'{"op": "outbox", "limit": "x"}')
        assert answer["ok"] is False and "limit" in answer["error"]
        out = await asyncio.to_thread(otpd, "status", "--config", str(config))
        assert out.returncode == 0 and "smtp local: ok" in out.stdout
        out = await asyncio.to_thread(otpd, "unblock", "+628121111222", "--config", str(config))
        assert out.returncode == 0 and "unblocked" in out.stdout
        assert (tmp_path / "control.sock").stat().st_mode & 0o777 == 0o660
    finally:
        await run.daemon.stop()
    out = await asyncio.to_thread(otpd, "status", "--config", str(config))
    assert out.returncode == 1 and "cannot reach the daemon" in out.stderr


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_and_sighup_reload(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    config = write_config(tmp_path, rest_port=port)
    text = config.read_text().replace(
        "[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', 1)
    text = text.replace('listen = "127.0.0.1', 'listen = "0.0.0.0')  # TLS: allowed off loopback
    config.write_text(text)
    log = tmp_path / "otpd.log"
    with log.open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "otpd", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as https:
            client = Client(https, f"https://127.0.0.1:{port}")
            for _ in range(100):
                try:
                    status, _ = await client.call("echo", {})
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            assert status == 200
            # A new user and a renewed certificate take effect on SIGHUP, no restart.
            set_user(tmp_path / "users", "late", "late-password", cost=4)
            renewed = tmp_path / "renewed"
            renewed.mkdir()
            cert2, key2 = make_cert(renewed)
            os.replace(cert2, cert)
            os.replace(key2, key)
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.5)
            ctx2 = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx2)) as s2:
                status, body = await Client(s2, f"https://127.0.0.1:{port}").call(
                    "echo", {"x": 1}, user="late", password="late-password")
                assert status == 200 and body["data"] == {"x": 1}
        assert proc.poll() is None  # still running after the reload
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "reloaded" in log.read_text()
