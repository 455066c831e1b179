"""The blocking OtpClient and the ``otpd client`` commands, against a running daemon.
Both block, so they run in a thread while the daemon runs on the test's loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from pathlib import Path

import pytest

from otpd.client import OtpClient, TransportError
from otpd.client.cli import add_parser
from tests.support.brokers import receiver
from tests.support.client_config import phone
from tests.support.daemon import free_port
from tests.support.gateway import MakeGateway
from tests.support.mail import body_text, code_in
from tests.support.services import REDIS_URL


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otpd")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = parser().parse_args(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("method", ["rest", "mqtt"])
async def test_sync_client(method: str, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(method)
    config = gw.client_config(client="wait_result = true")
    number = phone()

    def use() -> list[str]:
        codes: list[str] = []
        with OtpClient(config) as otp:
            codes.append(otp.get_modem_list().response_code)
            codes.append(otp.send_sms(number, "from a thread", 60).response_code)
            r = otp.verify_otp(number, "123456", "unknown-ref")
            codes.append(r.response_code)
        with pytest.raises(RuntimeError):
            otp.get_modem_list()
        return codes

    assert await asyncio.to_thread(use) == ["0000", "0000", "1202"]
    assert await gw.sms_text(number[1:]) == "from a thread"


async def test_sync_client_errors_are_raised_in_the_caller() -> None:
    from otpd.client import parse_client_config

    config = parse_client_config(
        f'[client]\nconnect_timeout = 1\n[rest]\nurl = "http://127.0.0.1:{free_port()}/api/otp"\n')

    def use() -> None:
        with OtpClient(config) as otp:
            otp.send_sms(phone(), "x", 60)

    with pytest.raises(TransportError):
        await asyncio.to_thread(use)


async def test_cli(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway("redis")
    config = tmp_path / "client.toml"
    # The file names the REST method; --method redis switches to the broker.
    config.write_text(gw.toml("rest") + f'[redis]\nurl = "{REDIS_URL}"\ntopic = "{gw.topic}"\n')
    base = ["client", "--config", str(config)]

    code, out, err = await asyncio.to_thread(run_cli, [*base, "check-config"])
    assert code == 0 and "method rest" in out, err

    code, out, _ = await asyncio.to_thread(run_cli, [*base, "modem-list", "--method", "redis"])
    assert code == 0
    assert "sim1" in json.loads(out)["data"]["modem_list"]

    number = phone()
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "create-otp", number, "cli-1", "--message", "Kode %s", "--param", "7",
                  "--param", "8", "--lifetime", "60"])
    answer = json.loads(out)
    assert code == 0 and answer["response_code"] == "0000" and answer["command"] == "request-otp"
    otp = code_in(await gw.sms_text(number[1:]))
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "--method", "redis", "verify-otp", number, "cli-1", "000000" if
                  otp != "000000" else "111111", "--param", "7", "--param", "8"])
    assert code == 1 and json.loads(out)["response_code"] == "1202"
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "verify-otp", number, "cli-1", otp, "--param", "7", "--param", "8",
                  "-m", "redis"])
    assert code == 0 and json.loads(out)["response_code"] == "0000"

    # Fire-and-forget over the broker: 1111, exit 0; with --wait the daemon's result.
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "-m", "redis", "send-sms", number, "hello"])
    assert code == 0 and json.loads(out)["response_code"] == "1111"
    assert await gw.sms_text(number[1:], count=2) == "hello"
    address = receiver()
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "send-email", address, "Subject line", "Body text", "--wait",
                  "-m", "redis"])
    assert code == 0 and json.loads(out)["response_code"] == "0000"
    mail = await gw.mail(address)
    assert mail["Subject"] == "Subject line" and "Body text" in body_text(mail)
    code, out, _ = await asyncio.to_thread(
        run_cli, [*base, "send-message", receiver(), "no subject", "--id", "m-1"])
    assert code == 0 and json.loads(out)["data"]["id"] == "m-1"

    blocked = phone()
    code, out, _ = await asyncio.to_thread(run_cli, [*base, "block", blocked])
    assert code == 0
    code, out, _ = await asyncio.to_thread(run_cli, [*base, "send-sms", blocked, "x"])
    assert code == 1 and json.loads(out)["response_code"] == "1400"
    code, out, _ = await asyncio.to_thread(run_cli, [*base, "unblock", blocked])
    assert code == 0 and json.loads(out)["response_code"] == "0000"

    # Bad configuration: exit 2 with the key named; no answer: exit 3.
    bad = tmp_path / "bad.toml"
    bad.write_text('[client]\nmethod = "carrier-pigeon"\n[rest]\ntimeout = 1\n')
    code, out, err = await asyncio.to_thread(run_cli, ["client", "-c", str(bad), "modem-list"])
    assert code == 2 and out == ""
    assert "client.method: must be one of" in err and "rest.timeout: unknown key" in err
    dead = tmp_path / "dead.toml"
    dead.write_text(f'[client]\nconnect_timeout = 1\n[rest]\n'
                    f'url = "http://127.0.0.1:{free_port()}/api/otp"\n')
    code, out, err = await asyncio.to_thread(run_cli, ["client", "-c", str(dead), "modem-list"])
    assert code == 3 and out == "" and "REST http://127.0.0.1" in err
