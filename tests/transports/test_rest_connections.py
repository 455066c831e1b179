"""The REST listener under slow, idle and too many connections, over real sockets:
a daemon held to 256 descriptors (a subprocess) still answers another address
while one address floods it; slow heads, stalled bodies and idle keep-alive
connections are closed; connections over a cap are refused at once; no version
in ``Server``; ``100 Continue`` only after authentication."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from otpd.aio import within
from tests.support.daemon import (
    API_PASSWORD,
    API_USER,
    Client,
    Running,
    free_port,
    start_daemon,
    write_config,
)
from tests.support.processes import DaemonProcess, self_signed
from tests.support.waiting import wait_until

NOFILE = 256
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def server_keys(config: Path, lines: str) -> Path:
    """Add ``lines`` to the [server] table of a written configuration."""
    text = config.read_text()
    assert text.count("[server]\n") == 1
    config.write_text(text.replace("[server]\n", f"[server]\n{lines}\n", 1))
    return config


def basic(user: str = API_USER, password: str = API_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def connect(port: int, source: str = "127.0.0.1") -> Stream:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One response: status line, headers (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> str:
    """Reads until the server closes: "eof" (FIN) or "reset" (RST)."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def close(stream: Stream) -> None:
    stream[1].transport.abort()


# -- a flood from one address against a daemon held to 256 descriptors ----------------

def _hold_descriptors() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class LimitedDaemon(DaemonProcess):
    """``python -m otpd run`` allowed NOFILE descriptors."""

    def start(self) -> None:
        with self.log.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otpd", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ),
                preexec_fn=_hold_descriptors)
        self.starts += 1


@pytest.fixture
async def limited(tmp_path: Path, session: aiohttp.ClientSession
                  ) -> AsyncIterator[LimitedDaemon]:
    port = free_port()
    # Short head timeout; a long keep-alive, so that the head timeout is what is tested.
    config = server_keys(write_config(tmp_path, rest_port=port),
                         "header_timeout = 1.5\nbody_timeout = 1.5\nkeepalive_timeout = 30")
    daemon = LimitedDaemon(config, tmp_path / "otpd.log",
                           Client(session, f"http://127.0.0.1:{port}"))
    daemon.start()
    try:
        await daemon.wait_ready(30)
        yield daemon
    finally:
        daemon.kill()


async def test_flood_from_one_address_does_not_starve_another(limited: LimitedDaemon) -> None:
    port = int(limited.client.base.rsplit(":", 1)[1])
    assert f"descriptor limit {NOFILE}" in limited.log_text()
    opened: list[tuple[Stream | None, float]] = []
    stop = asyncio.Event()

    async def trickle(stream: Stream) -> None:
        """Slowloris: a request head, a byte at a time, never finished."""
        writer = stream[1]
        with contextlib.suppress(ConnectionError):
            writer.write(b"POST /api/otp HTTP/1.1\r\nHost: otpd\r\n")
            while not stop.is_set() and not writer.transport.is_closing():
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.2)

    tricklers = []
    try:
        # 40 trickling connections first (each gets in), then 400 idle ones.
        for i in range(440):
            try:
                stream: Stream | None = await within(3, connect(port))
            except ConnectionResetError:
                stream = None  # refused so fast that connect() saw the reset
            except TimeoutError:
                break  # the listener stopped accepting (asserted below)
            opened.append((stream, time.monotonic()))
            if i < 40:
                assert stream is not None
                tricklers.append(asyncio.create_task(trickle(stream)))
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                other = await connect(port, "127.0.0.2")
                other[1].write(b"GET /healthz HTTP/1.1\r\nHost: otpd\r\n\r\n")
                status, _, answer = await read_response(other[0])
        except TimeoutError:
            pytest.fail(f"another address not answered within 5 s ({len(opened)} of 440"
                        " flooding connections were set up)")
        answered_in = time.monotonic() - started
        assert len(opened) == 440
        print(f"another address answered in {answered_in:.3f} s")
        assert status == "HTTP/1.1 200 OK" and json.loads(answer) == {"status": "ok"}
        assert answered_in < 5
        close(other)

        # Every flooding connection is closed by the server: at once over the cap,
        # at the head timeout (1.5 s) when admitted, trickling or not.
        async def outcome(stream: Stream | None, since: float) -> tuple[str, float]:
            if stream is None:
                return "reset", 0.0
            how = await within(8, closed_by_server(stream[0]))
            return how, time.monotonic() - since

        results = await asyncio.gather(*(outcome(s, t) for s, t in opened))
    finally:
        stop.set()
        await asyncio.gather(*tricklers, return_exceptions=True)
        for stream, _ in opened:
            if stream is not None:
                close(stream)
    admitted = [(how, held) for how, held in results if held >= 1.0]
    assert 40 <= len(admitted) <= 192, len(admitted)  # the tricklers got in; the cap held
    assert all(held < 5 for _, held in admitted), max(held for _, held in admitted)
    assert sum(how == "eof" for how, _ in admitted) >= 40  # closed, not crashed
    held_back = [held for _, held in results[:40]]
    assert min(held_back) >= 1.4, "a trickling head was cut before the head timeout"
    # Still serving, and the log says what happened in a few lines.
    code, echoed = await limited.client.call("echo", {"after": "flood"})
    assert code == 200 and echoed["data"] == {"after": "flood"}
    log = limited.log_text()
    assert log.count("Too many open files") < 5
    assert len(log.splitlines()) < 50, log[-3000:]
    assert "refused 1 connection(s) over the caps" in log


# -- timeouts, caps, headers and Expect against an in-process daemon ----------------

@pytest.fixture
async def run(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Running]:
    config = server_keys(write_config(tmp_path),
                         "header_timeout = 1\nbody_timeout = 1\nkeepalive_timeout = 1\n"
                         "max_connections = 5\nmax_connections_per_address = 3")
    running = await start_daemon(config, session)
    yield running
    await running.daemon.stop()


def rest_port(run: Running) -> int:
    assert run.daemon.rest is not None and run.daemon.rest.port is not None
    return run.daemon.rest.port


async def refused_at_once(port: int, source: str = "127.0.0.1") -> None:
    """A connection from ``source`` is closed before any HTTP: the request gets no answer."""
    started = time.monotonic()
    try:
        reader, writer = await connect(port, source)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: otpd\r\n\r\n")
        assert await within(5, reader.read(100)) == b""
    except ConnectionResetError:
        pass  # reset, possibly even before connect() returned
    assert time.monotonic() - started < 0.5


async def timed_close(stream: Stream) -> tuple[str, float]:
    started = time.monotonic()
    how = await within(5, closed_by_server(stream[0]))
    return how, time.monotonic() - started


async def test_stalled_body_is_closed(run: Running) -> None:
    stream = await connect(rest_port(run))
    stream[1].write(b"POST /api/otp HTTP/1.1\r\nHost: otpd\r\nAuthorization: "
                    + basic().encode() + b"\r\nContent-Length: 100\r\n\r\n{\"command\":")
    how, after = await timed_close(stream)
    assert how == "eof" and 0.8 <= after < 3


async def test_idle_keepalive_connection_is_closed(run: Running) -> None:
    reader, writer = await connect(rest_port(run))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: otpd\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and headers.get("connection", "") != "close"
    how, after = await timed_close((reader, writer))
    assert how == "eof" and 0.8 <= after < 3


async def test_connection_caps_per_address_and_in_all(run: Running) -> None:
    port = rest_port(run)
    held = [await connect(port) for _ in range(3)]
    await refused_at_once(port)  # a fourth from 127.0.0.1
    # Other addresses fill the total of 5; the next is refused too.
    held += [await connect(port, "127.0.0.2"), await connect(port, "127.0.0.3")]
    await refused_at_once(port, "127.0.0.4")
    guard = run.daemon.rest.guard if run.daemon.rest else None
    assert guard is not None
    assert guard.stats()["refused_per_address"] == 1 and guard.stats()["refused_total"] == 1
    # A closed connection gives its place back.
    close(held.pop(0))
    await wait_until(lambda: guard.caps.held("127.0.0.1") == 2, 3, "the slot released")
    reader, writer = await connect(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: otpd\r\n\r\n")
    status, _, _ = await within(3, read_response(reader))
    assert status == "HTTP/1.1 200 OK"
    for stream in [*held, (reader, writer)]:
        close(stream)


async def test_server_header_has_no_version(run: Running) -> None:
    port = rest_port(run)
    reader, writer = await connect(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: otpd\r\n\r\n")
    _, headers, _ = await read_response(reader)
    assert headers["server"] == "otpd"
    writer.write(b"POST /api/otp HTTP/1.1\r\nHost: otpd\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, _ = await read_response(reader)
    assert status.startswith("HTTP/1.1 401") and headers["server"] == "otpd"
    close((reader, writer))
    # aiohttp's own answer to a request it cannot parse.
    reader, writer = await connect(port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status.startswith("HTTP/1.0 400") and headers["server"] == "otpd"
    close((reader, writer))


@pytest.mark.parametrize("authorization", [basic(password="wrong"), None])
async def test_expect_100_continue_only_after_authentication(
        run: Running, authorization: str | None) -> None:
    reader, writer = await connect(rest_port(run))
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    writer.write(f"POST /api/otp HTTP/1.1\r\nHost: otpd\r\n{auth}Content-Length: 35\r\n"
                 "Expect: 100-continue\r\n\r\n".encode())
    # The body is never sent: the answer must come without it, and be final.
    status, _, body = await within(5, read_response(reader))
    assert status.startswith("HTTP/1.1 401"), status
    assert json.loads(body)["response_code"] == "1100"
    close((reader, writer))


async def test_expect_100_continue_for_a_valid_user(run: Running) -> None:
    reader, writer = await connect(rest_port(run))
    payload = b'{"command":"echo","data":{"x":1}}'
    writer.write(f"POST /api/otp HTTP/1.1\r\nHost: otpd\r\nAuthorization: {basic()}\r\n"
                 f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\n\r\n".encode())
    interim = await within(5, reader.readuntil(b"\r\n\r\n"))
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(payload)
    status, _, body = await within(5, read_response(reader))
    assert status == "HTTP/1.1 200 OK" and json.loads(body)["data"] == {"x": 1}
    # Any other expectation is refused, in JSON like every answer.
    writer.write(f"POST /api/otp HTTP/1.1\r\nHost: otpd\r\nAuthorization: {basic()}\r\n"
                 "Content-Length: 2\r\nExpect: something-else\r\n\r\n".encode())
    status, _, body = await within(5, read_response(reader))
    assert status.startswith("HTTP/1.1 417") and json.loads(body)["response_code"] == "1300"
    close((reader, writer))


async def test_tls_handshake_is_bounded_by_the_header_timeout(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    cert, key = self_signed(tmp_path)
    config = server_keys(write_config(tmp_path),
                         f'tls_cert = "{cert}"\ntls_key = "{key}"\nheader_timeout = 1')
    running = await start_daemon(config, session)
    try:
        port = rest_port(running)
        # Connected, never a ClientHello: closed at the header timeout.
        how, after = await timed_close(await connect(port))
        assert how in ("eof", "reset") and 0.8 <= after < 3
        context = ssl.create_default_context(cafile=str(cert))
        async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=context) as resp:
            assert resp.status == 200 and resp.headers["Server"] == "otpd"
    finally:
        await running.daemon.stop()
