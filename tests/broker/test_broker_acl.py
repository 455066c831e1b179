"""Topic permissions of ``otpd broker`` against the real broker over real
WebSockets: the attacks they stop (snooping on the command topic, forged
replies), the secure defaults, reloads (SIGHUP through the real CLI) and the
unchanged OTP-Publisher PHP client under the documented one-line rule."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from otpd.aio import within
from otpd.auth.htpasswd import hash_password
from otpd.broker import BrokerServer
from tests.support.waiting import wait_until

from .conftest import MakeBroker, RawClient, assert_silent, basic, recv_text
from .test_broker_cli import parse

REPO = Path(__file__).resolve().parents[2]

# otpd's account, two applications (kamshory: OTP-Publisher's user:user),
# and accounts the ACL names partly or not at all.
PASSWORDS = {
    "otpd": "daemon-pw",
    "kamshory": "kamshory",
    "mallory": "mallory-pw",
    "eve": "eve-pw",
    "nobody": "nobody-pw",
}

# The shape of etc/broker.acl.example, plus a second application (mallory)
# and an account that may only read reply topics (eve). nobody has no line.
RULES = """\
otpd      sub=sms  pub=otp-reply-*,modem-list-*,ussd-*
kamshory  pub=sms  sub=otp-reply-*,modem-list-*,ussd-*
mallory   pub=sms  sub=otp-reply-*,modem-list-*,ussd-*
eve       sub=otp-reply-*
"""

FORGED = json.dumps({"command": "verify-otp", "response_code": "0000"})
REAL = json.dumps({"command": "verify-otp", "response_code": "1302"})
COMMAND = json.dumps({"command": "request-otp",
                      "data": {"receiver": "08123456789", "message": "Your code 917345"}})


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    path = tmp_path / "broker.htpasswd"
    path.write_text("".join(f"{u}:{hash_password(pw, cost=4)}\n" for u, pw in PASSWORDS.items()))
    return path


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "broker.acl"
    path.write_text(RULES)
    return path


@pytest.fixture
async def acl_broker(make_broker: MakeBroker, accounts: Path, rules: Path) -> BrokerServer:
    return await make_broker(htpasswd=accounts, acl=rules)


def as_user(broker: BrokerServer, user: str, topic: str) -> connect:
    return connect(f"ws://127.0.0.1:{broker.port}/ws?topic={topic}",
                   additional_headers={"Authorization": basic(user, PASSWORDS[user])},
                   open_timeout=5)


async def refused_status(broker: BrokerServer, user: str, topic: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with as_user(broker, user, topic):
            pass
    return info.value.response.status_code


async def closed_with(ws: ClientConnection) -> int | None:
    """Read until the server closes; the close code it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await within(5, ws.recv())
    return info.value.rcvd.code if info.value.rcvd is not None else None


# -- the attacks ----------------------------------------------------------------


async def test_snooping_on_the_command_topic(acl_broker: BrokerServer) -> None:
    """Another application's account may publish on ``sms`` but never reads it;
    an account with no right on ``sms`` is not let in at all."""
    broker = acl_broker
    assert await refused_status(broker, "eve", "sms") == 403
    async with (
        as_user(broker, "otpd", "sms") as daemon,
        as_user(broker, "mallory", "sms") as snoop,
        as_user(broker, "kamshory", "sms") as app,
    ):
        await wait_until(lambda: broker.clients == 3)
        await app.send(COMMAND)
        assert await recv_text(daemon) == COMMAND
        await assert_silent(snoop)
        # The app's own publishing connection does not read other apps' commands either.
        await snoop.send(COMMAND.replace("917345", "000000"))
        assert "000000" in await recv_text(daemon)
        await assert_silent(app)


async def test_forged_reply_is_refused_and_never_delivered(
    acl_broker: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = acl_broker
    topic = "otp-reply-5f0c2e2a-9d1b-4c1e-8a57-3d2f0e4b6c11"
    async with as_user(broker, "kamshory", topic) as waiting:
        for forger in ("mallory", "eve"):  # both may subscribe to reply topics
            async with as_user(broker, forger, topic) as fake:
                await wait_until(lambda: broker.clients == 2)
                await fake.send(FORGED)
                assert await closed_with(fake) == 1008
            await wait_until(lambda: broker.clients == 1)
        # otpd's real answer is the first and only frame the application sees.
        async with as_user(broker, "otpd", topic) as daemon:
            await daemon.send(REAL)
        assert await recv_text(waiting) == REAL
        await assert_silent(waiting)
    refusals = [r.getMessage() for r in caplog.records
                if "refused a frame" in r.getMessage()]
    assert len(refusals) == 2 and "user='mallory'" in refusals[0]
    assert "0000" not in " ".join(refusals)  # payloads never reach the log


async def test_user_without_rule_gets_403_and_a_log_line(
    acl_broker: BrokerServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = acl_broker
    caplog.set_level(logging.INFO, "otpd.broker")
    for topic in ("sms", "otp-reply-x", "anything"):
        assert await refused_status(broker, "nobody", topic) == 403
    lines = [r for r in caplog.records if "user='nobody'" in r.getMessage()]
    assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in lines)
    assert "has no rule in the ACL file" in lines[0].getMessage()
    assert str(broker.config.acl_path) in lines[0].getMessage()
    assert broker.clients == 0
    # A user with rules, but none for this topic, is refused the same way.
    assert await refused_status(broker, "kamshory", "sms2") == 403
    # The password is still checked first: a wrong one is 401, not 403.
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{broker.port}/ws?topic=sms",
                           additional_headers={"Authorization": basic("nobody", "x")}):
            pass
    assert info.value.response.status_code == 401


async def test_missing_acl_file_lets_nobody_in(
    make_broker: MakeBroker, accounts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await make_broker(htpasswd=accounts, acl=tmp_path / "absent.acl")
    assert any("absent.acl does not exist: nobody may publish or subscribe" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    for user in ("otpd", "kamshory"):
        assert await refused_status(broker, user, "sms") == 403


async def test_default_acl_is_next_to_the_users_file(
    make_broker: MakeBroker, accounts: Path, rules: Path
) -> None:
    assert rules.parent == accounts.parent and rules.name == "broker.acl"
    broker = await make_broker(htpasswd=accounts, acl=None)
    assert broker.config.acl_path == rules
    async with as_user(broker, "otpd", "sms"):
        await wait_until(lambda: broker.clients == 1)
    assert await refused_status(broker, "nobody", "sms") == 403


# -- reloading ------------------------------------------------------------------


async def test_reload_rechecks_open_connections(
    acl_broker: BrokerServer, rules: Path, accounts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = acl_broker
    async with (
        as_user(broker, "otpd", "sms") as daemon,
        as_user(broker, "kamshory", "sms") as app,
        as_user(broker, "mallory", "otp-reply-1") as mallory,
    ):
        await wait_until(lambda: broker.clients == 3)
        # otpd loses subscribe on sms (keeps publish), kamshory loses everything,
        # mallory disappears from the users file.
        rules.write_text("otpd pub=sms\nmallory sub=otp-reply-*\nnobody pubsub=sms\n")
        accounts.write_text("".join(f"{u}:{hash_password(pw, cost=4)}\n"
                                    for u, pw in PASSWORDS.items() if u != "mallory"))
        broker.reload()
        assert await closed_with(app) == 1008
        assert await closed_with(mallory) == 1008
        await wait_until(lambda: broker.clients == 1)
        async with as_user(broker, "nobody", "sms") as newcomer:
            await wait_until(lambda: broker.clients == 2)
            # otpd still publishes but no longer receives.
            await daemon.send("from otpd")
            assert await recv_text(newcomer) == "from otpd"
            await newcomer.send("to otpd")
            await assert_silent(daemon)
    messages = [r.getMessage() for r in caplog.records]
    assert any("user='kamshory'" in m and "no permission" in m for m in messages)
    assert any("user='mallory'" in m and "user removed" in m for m in messages)


async def test_bad_file_on_reload_keeps_the_rules(
    acl_broker: BrokerServer, rules: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = acl_broker
    async with as_user(broker, "kamshory", "sms") as app, as_user(broker, "otpd", "sms") as d:
        rules.write_text("otpd sub=sms\nkamshory publish=sms\n")
        broker.reload()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "keeping the previous topic permissions" in errors[0]
        assert f"{rules}: line 2: unknown permission 'publish'" in errors[0]
        await app.send("still allowed")
        assert await recv_text(d) == "still allowed"
    assert await refused_status(broker, "nobody", "sms") == 403


# -- the real CLI: bad file at start, SIGHUP --------------------------------------


def test_bad_acl_file_at_start_exits_2_naming_the_line(
    accounts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acl = tmp_path / "broker.acl"
    acl.write_text("# ok so far\notpd sub=sms\nkamshory pub=sms sub\nshop\n")
    args = parse("broker", "--htpasswd", str(accounts), "--acl", str(acl),
                 "--listen", "127.0.0.1:0")
    assert args.func(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"otpd broker: {acl}: line 3: 'sub' is not PERMISSION=TOPICS",
                   f"otpd broker: {acl}: line 4: user 'shop' has no PERMISSION=TOPICS "
                   "(pub=, sub= or pubsub=)"]


class BrokerProcess:
    """``python -m otpd broker`` with its log read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())
        self.port = 0

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())

    def logged(self, pattern: str, start: int = 0) -> re.Match[str] | None:
        for line in self.lines[start:]:
            if m := re.search(pattern, line):
                return m
        return None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


@pytest.fixture
async def cli_broker(accounts: Path, rules: Path) -> AsyncIterator[BrokerProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "otpd", "broker", "--htpasswd", str(accounts),
        "--acl", str(rules), "--listen", "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    broker = BrokerProcess(proc)
    try:
        m = await wait_until(lambda: broker.logged(r"listening on ws://127\.0\.0\.1:(\d+)/ws")
                             or proc.returncode is not None, 20, "broker listening")
        assert proc.returncode is None, "".join(broker.lines)
        broker.port = int(m.group(1))
        yield broker
    finally:
        await broker.stop()


async def test_sighup_reloads_through_the_cli(cli_broker: BrokerProcess, rules: Path) -> None:
    url = f"ws://127.0.0.1:{cli_broker.port}/ws?topic="

    def as_(user: str, topic: str) -> connect:
        return connect(url + topic, open_timeout=5,
                       additional_headers={"Authorization": basic(user, PASSWORDS[user])})

    with pytest.raises(InvalidStatus) as info:
        async with as_("nobody", "sms"):
            pass
    assert info.value.response.status_code == 403
    async with as_("otpd", "sms") as daemon, as_("kamshory", "sms") as app:
        await app.send("before")
        assert await within(5, daemon.recv()) == "before"
        rules.write_text(RULES.replace("kamshory  pub=sms", "kamshory  sub=sms")
                         + "nobody pub=sms\n")
        mark = len(cli_broker.lines)
        cli_broker.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: cli_broker.logged("access changed user='kamshory'", mark),
                         10, "reload logged")
        # kamshory may no longer publish: its next frame closes it (1008) and is not relayed.
        await app.send("after")
        assert await closed_with(app) == 1008
        async with as_("nobody", "sms") as newcomer:
            await newcomer.send("newcomer")
            assert await within(5, daemon.recv()) == "newcomer"
        # A bad file: logged with its line, the rules in force stay.
        rules.write_text("nobody pub=sms\nthis line is wrong\n")
        mark = len(cli_broker.lines)
        cli_broker.proc.send_signal(signal.SIGHUP)
        m = await wait_until(lambda: cli_broker.logged("keeping the previous topic permissions"
                                                       r".*(line \d+.*)", mark), 10, "error")
        assert m.group(1).startswith("line 2: 'line' is not PERMISSION=TOPICS")
        async with as_("otpd", "otp-reply-1") as reply:
            await reply.send("still otpd")
    assert cli_broker.proc.returncode is None
    assert cli_broker.logged("refused a frame from user='kamshory'")


# -- OTP-Publisher, unchanged -----------------------------------------------------


def example_line(user: str) -> str:
    """The line of etc/broker.acl.example that starts with ``user``."""
    for line in (REPO / "etc" / "broker.acl.example").read_text().splitlines():
        if line.split()[:1] == [user]:
            return line + "\n"
    raise AssertionError(f"no line for {user} in the example")


async def test_php_client_works_under_the_documented_one_line_rule(
    make_broker: MakeBroker, accounts: Path, tmp_path: Path
) -> None:
    """Raw ``Basic user:user``, one connection per command closed without a
    close frame, then a connection on the callback topic it named itself."""
    acl = tmp_path / "documented.acl"
    acl.write_text(example_line("otpd") + example_line("kamshory"))
    broker = await make_broker(htpasswd=accounts, acl=acl)
    php_auth = "Basic kamshory:kamshory"
    for callback in ("modem-list-a1B2c3", "ussd-Zz9x0Q", "otp-reply-1f0e"):
        async with as_user(broker, "otpd", "sms") as daemon:
            await wait_until(lambda: broker.clients == 1)
            php = await RawClient.open(broker.port, "/ws/?topic=sms", php_auth)
            assert php.status == 101
            body = json.dumps({"command": "get-modem-list", "callback_topic": callback})
            await php.send_text(body)
            php.abort()
            assert await recv_text(daemon) == body
            async with connect(f"ws://127.0.0.1:{broker.port}/ws/?topic={callback}",
                               additional_headers={"Authorization": php_auth}) as answer:
                await wait_until(lambda: broker.clients == 2)
                async with as_user(broker, "otpd", callback) as reply:
                    await reply.send(REAL)
                assert await recv_text(answer) == REAL
        await wait_until(lambda: broker.clients == 0)

