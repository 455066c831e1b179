"""Processes of a test's own: the daemon (``python -m otpd run``, to SIGKILL it),
brokers (Redis, Mosquitto) on spare ports; and a self-signed certificate for
TLS listeners on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from tests.support.daemon import Client, free_port
from tests.support.services import require_binary


class OtpdChild:
    """A ``python -m otpd run`` subprocess whose stderr goes to ``log``: stopped
    with SIGTERM or SIGKILL, its log read back."""

    proc: subprocess.Popen[bytes] | None
    log: Path

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit status (SIGKILL and -9 after ``timeout``; 0 if never started)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class DaemonProcess(OtpdChild):
    """``python -m otpd run`` with its stderr appended to one log across restarts."""

    def __init__(self, config: Path, log: Path, client: Client,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.client = client
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otpd", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=self.env or dict(os.environ),
            )
        self.starts += 1

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until REST answers ``echo`` (the store is open and the engine started)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"otpd exited with {self.proc.returncode}:\n"
                                     + self.log_text()[-3000:])
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status, _ = await self.client.call("echo", {})
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("otpd did not become ready:\n" + self.log_text()[-3000:])



class Process:
    """A broker process of the test's own, on a spare port."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv, self.port, self.log = argv, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.argv[0]} is not listening on {self.port}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    async def restart(self, sig: signal.Signals) -> None:
        await asyncio.to_thread(self.stop, sig)
        await asyncio.sleep(0.3)  # publishes fail meanwhile
        await asyncio.to_thread(self.start)


def own_server(binary: str, argv: list[str], port: int, log: Path) -> Iterator[Process]:
    """Start ``argv`` (skip-or-fail without ``binary``); SIGKILL it at the end."""
    require_binary(binary)
    process = Process(argv, port, log)
    process.start()
    try:
        yield process
    finally:
        process.stop(signal.SIGKILL)


def own_redis(tmp_path: Path) -> Iterator[Process]:
    """A private redis-server; appendfsync always: an entry is on disk before XADD
    returns its id, so a confirmed entry survives even a SIGKILL of the server."""
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    yield from own_server("redis-server", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
        port, tmp_path / "redis.log")


def mosquitto_conf(tmp_path: Path, port: int, extra: str = "") -> Path:
    """A private Mosquitto: anonymous, persistent sessions kept in tmp_path (written
    on SIGTERM and every second), no limit on queued messages."""
    data = tmp_path / "mosquitto-data"
    data.mkdir(exist_ok=True)
    conf = tmp_path / "mosquitto.conf"
    # Started as root, Mosquitto switches to the user "mosquitto", which could not
    # write the persistence file here: stay the current user.
    conf.write_text(f"""
user {getpass.getuser()}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {data}/
autosave_interval 1
max_queued_messages 0
{extra}
""")
    return conf


def own_mosquitto(tmp_path: Path, extra: str = "") -> Iterator[Process]:
    port = free_port()
    conf = mosquitto_conf(tmp_path, port, extra)
    yield from own_server("mosquitto", ["mosquitto", "-c", str(conf)], port,
                          tmp_path / "mosquitto.log")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, made with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
