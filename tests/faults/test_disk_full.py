"""The store's disk fills up: commands are refused with 1102 (REST 503), the
daemon keeps answering, nothing it acknowledged is lost, and once space is
freed it takes commands again with an intact database.

The store lives on a 2 MB tmpfs of the test's own (``mount`` needs root or
CAP_SYS_ADMIN: without it the test is skipped, or fails under
``OTPD_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from otpd.aio import within
from tests.faults.helpers import outbox
from tests.support.daemon import Client, free_port, write_config
from tests.support.mail import SmtpServer, SmtpSink, tagged
from tests.support.processes import DaemonProcess
from tests.support.services import service_unreachable
from tests.support.waiting import wait_until

RCPT = "disk@example.org"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "store"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        service_unreachable("cannot mount a 2 MB tmpfs for the store (needs root or"
                            f" CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


async def test_store_disk_full(tmp_path: Path, small_disk: Path,
                               session: aiohttp.ClientSession) -> None:
    sink = SmtpSink()
    smtp = SmtpServer(sink, free_port())  # down for now: accepted mail stays pending
    rest_port = free_port()
    config = write_config(tmp_path, wait=0, rest_port=rest_port, smtp_port=smtp.port)
    config.write_text(config.read_text().replace(str(tmp_path / "otpd.db"),
                                                 str(small_disk / "otpd.db")))
    client = Client(session, f"http://127.0.0.1:{rest_port}")
    daemon = DaemonProcess(config, tmp_path / "otpd.log", client)
    accepted: list[str] = []
    counter = 0

    async def send() -> tuple[int, dict[str, object]]:
        nonlocal counter
        counter += 1
        tag = f"disk-{counter}"
        status, body = await client.call("send-email", {
            "id": tag, "receiver": RCPT, "subject": "disk", "message": tagged(tag)})
        if body["response_code"] in ("0000", "1111"):
            accepted.append(tag)
        return status, body

    filler = small_disk / "filler"
    daemon.start()
    try:
        await daemon.wait_ready()
        for _ in range(5):
            _, body = await send()
            assert body["response_code"] == "1111", body
        fill(filler)
        before_full = len(accepted)

        # Commands that need a write are refused as soon as the store cannot take them.
        refused: tuple[int, dict[str, object]] | None = None
        for _ in range(300):
            status, body = await within(15, send())
            if body["response_code"] != "1111":
                refused = (status, body)
                break
        assert refused is not None, "the store never ran out of space"
        status, body = refused
        assert (status, body["response_code"]) == (503, "1102"), refused
        assert "store" in str(body.get("message", "")), body
        for _ in range(3):  # still refused, still answering
            status, body = await within(15, send())
            assert (status, body["response_code"]) == (503, "1102"), body
        # The daemon keeps serving what needs no write.
        status, body = await client.call("echo", {"ping": 1})
        assert status == 200 and body["response_code"] == "0000", body
        status, body = await client.call("verify-otp", {
            "receiver": RCPT, "reference": "none", "otp": "123456"})
        assert body["response_code"] == "1202", body
        assert daemon.proc is not None and daemon.proc.poll() is None, "otpd died"

        # Space comes back: commands are taken again, everything accepted goes out.
        filler.unlink()
        status, body = await send()
        assert (status, body["response_code"]) == (200, "1111"), body
        smtp.start()
        await wait_until(lambda: set(accepted) <= set(sink.tags()), 30,
                       "every accepted message mailed")
        await asyncio.sleep(0.5)
        tags = sink.tags()
        assert sorted(tags) == sorted(accepted), "lost or duplicated"
        print(f"\ndisk full: {len(accepted)} accepted, all mailed once;"
              f" {len(accepted) - before_full - 1} more taken after the disk filled up,"
              f" then 1102")
        assert daemon.terminate() == 0, "no clean exit on SIGTERM"
    finally:
        daemon.kill()
        smtp.stop()
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()

    db = small_disk / "otpd.db"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    rows = outbox(db)
    assert sorted(str(r["dedupe_key"]).split("|")[0] for r in rows) == sorted(accepted)
    assert {r["state"] for r in rows} == {"sent"}


async def test_readyz_reports_a_full_store(tmp_path: Path, small_disk: Path,
                                           session: aiohttp.ClientSession) -> None:
    rest_port = free_port()
    config = write_config(tmp_path, wait=0, rest_port=rest_port, smtp_port=free_port())
    config.write_text(config.read_text().replace(str(tmp_path / "otpd.db"),
                                                 str(small_disk / "otpd.db")))
    client = Client(session, f"http://127.0.0.1:{rest_port}")
    daemon = DaemonProcess(config, tmp_path / "otpd.log", client)
    daemon.start()
    try:
        await daemon.wait_ready()
        async with session.get(f"http://127.0.0.1:{rest_port}/readyz") as resp:
            assert resp.status == 200
        fill(small_disk / "filler")
        status, body = await client.call("send-email", {
            "receiver": RCPT, "subject": "disk", "message": "refused"})
        assert (status, body["response_code"]) == (503, "1102"), body
        # What a load balancer or monitor asks: can this node take commands?
        async with session.get(f"http://127.0.0.1:{rest_port}/readyz") as resp:
            details = await resp.json()
            assert resp.status == 503, details
            assert details["store_writable"] is False, details
    finally:
        daemon.kill()
