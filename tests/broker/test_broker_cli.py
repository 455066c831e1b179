"""`otpd broker` command: argument parsing, start-up errors, SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from otpd.aio import within
from otpd.broker.cli import add_parser

from .conftest import basic

# Stands in for otpd/app/cli.py: a main parser with subcommands calling args.func.


RUNNER = """
import argparse, sys
from otpd.broker.cli import add_parser
parser = argparse.ArgumentParser(prog="otpd")
add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otpd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    args = parse("broker", "--htpasswd", "/etc/otpd/broker.users")
    assert args.listen == ("127.0.0.1", 9000)
    assert args.path == "/ws"
    assert args.max_message == 65536
    assert args.tls_cert is None and args.tls_key is None
    assert args.htpasswd == Path("/etc/otpd/broker.users")
    assert args.acl is None  # broker.acl next to the users file
    assert callable(args.func)


def test_options() -> None:
    args = parse(
        "broker", "--listen", "[::1]:9443", "--htpasswd", "u", "--path", "/ws/",
        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-message", "1024",
        "--acl", "/etc/otpd/topics.acl",
    )  # fmt: skip
    assert args.acl == Path("/etc/otpd/topics.acl")
    assert args.listen == ("::1", 9443)
    assert args.path == "/ws/"
    assert args.max_message == 1024
    assert args.tls_cert == Path("c.pem") and args.tls_key == Path("k.pem")


@pytest.mark.parametrize(
    "argv",
    [
        ["broker"],  # --htpasswd is required
        ["broker", "--htpasswd", "u", "--listen", "nohost"],
        ["broker", "--htpasswd", "u", "--listen", "h:99999"],
        ["broker", "--htpasswd", "u", "--max-message", "0"],
    ],
)
def test_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_tls_needs_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("broker", "--htpasswd", str(tmp_path / "u"), "--tls-cert", "c.pem")
    assert args.func(args) == 2
    assert "tls_cert and tls_key" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["0.0.0.0:9000", "[::]:9000", "192.0.2.7:9000",
                                    "broker.example.net:9000"])
def test_plain_text_off_loopback_is_refused(tmp_path: Path, listen: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("broker", "--htpasswd", str(tmp_path / "u"), "--listen", listen)
    assert args.func(args) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_plain_text_off_loopback_when_told_so(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("broker", "--htpasswd", str(tmp_path / "absent"), "--listen", "0.0.0.0:0",
                 "--allow-plain-http")
    assert args.func(args) == 2  # gets past the listen check, to the missing users file
    err = capsys.readouterr().err
    assert "cannot read" in err and "not a loopback address" not in err


def test_bad_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("broker", "--htpasswd", str(tmp_path / "absent"), "--listen", "127.0.0.1:0")
    assert args.func(args) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_runs_until_sigterm(users_file: Path, acl_file: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUNNER, "broker", "--htpasswd", str(users_file),
        "--acl", str(acl_file), "--listen", "127.0.0.1:0", "--path", "/ws/",
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        port = 0
        async with asyncio.timeout(15):
            while not port:
                line = (await proc.stderr.readline()).decode()
                assert line, "broker exited early"
                if m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ws/", line):
                    port = int(m.group(1))
        url = f"ws://127.0.0.1:{port}/ws?topic=sms"
        headers = {"Authorization": basic("alice", "alice-pw")}
        async with connect(url, additional_headers=headers) as a:
            async with connect(url, additional_headers=headers) as b:
                await asyncio.sleep(0.1)
                await a.send("hello")
                assert await within(5, b.recv()) == "hello"
            proc.send_signal(signal.SIGTERM)
            assert await within(10, proc.wait()) == 0
            # The remaining client was told the server is going away.
            await within(5, a.wait_closed())
            assert a.close_code == 1001
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_connection_caps_options() -> None:
    args = parse("broker", "--htpasswd", "u")
    assert args.max_connections is None and args.max_connections_per_address is None
    args = parse("broker", "--htpasswd", "u", "--max-connections", "100",
                 "--max-connections-per-address", "8")
    assert (args.max_connections, args.max_connections_per_address) == (100, 8)
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit):
            parse("broker", "--htpasswd", "u", "--max-connections", bad)
        with pytest.raises(SystemExit):
            parse("broker", "--htpasswd", "u", "--max-connections-per-address", bad)
