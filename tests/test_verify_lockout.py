"""verify-otp over real HTTP: strangers cannot lock a receiver out. Made-up, used
or foreign references count against the client that sent them, never against
the receiver; wrong codes for the receiver's own OTP still do."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from otpd.auth.htpasswd import set_user
from tests.support.daemon import API_PASSWORD, API_USER, Running, start_daemon, write_config
from tests.support.mail import SmtpServer, otp_in

VICTIM = "victim@example.org"
OTHER = "other@example.org"
STRANGER, STRANGER_PASSWORD = "stranger", "stranger-password"


async def request_otp(run: Running, smtp: SmtpServer, receiver: str, reference: str) -> str:
    _, body = await run.client.call("request-otp", {
        "receiver": receiver, "reference": reference, "message": "Your OTP is %s"})
    assert body["response_code"] == "0000", body
    return otp_in(smtp.sink.to(receiver)[-1])


async def verify(run: Running, receiver: str, reference: str, code: str,
                 *, stranger: bool = False) -> str:
    user, password = (STRANGER, STRANGER_PASSWORD) if stranger else (API_USER, API_PASSWORD)
    _, body = await run.client.call("verify-otp", {
        "receiver": receiver, "reference": reference, "otp": code},
        user=user, password=password)
    return str(body["response_code"])


async def start(tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession,
                limits: str) -> Running:
    config = write_config(tmp_path, smtp_port=smtp.port, limits="receiver_cooldown = 0\n"
                          + limits)
    set_user(tmp_path / "users", STRANGER, STRANGER_PASSWORD, cost=4)  # a second REST user
    return await start_daemon(config, session)


async def test_bogus_references_from_one_user_do_not_stop_anothers_code(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    run = await start(tmp_path, smtp, session, "client_verify_failures_max = 12")
    try:
        code = await request_otp(run, smtp, VICTIM, "login-1")
        answers = [await verify(run, VICTIM, f"made-up-{i}", "000000", stranger=True)
                   for i in range(15)]
        # The stranger's guessing is throttled: per client, not per receiver.
        assert answers == ["1202"] * 12 + ["1401"] * 3
        assert await verify(run, VICTIM, "login-1", code) == "0000"
    finally:
        await run.daemon.stop()


async def test_used_references_and_another_receivers_otp_count_against_nobody(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    run = await start(tmp_path, smtp, session, "verify_failures_max = 3")
    try:
        used = await request_otp(run, smtp, VICTIM, "used-1")
        assert await verify(run, VICTIM, "used-1", used) == "0000"
        for _ in range(4):  # replays of a used reference
            assert await verify(run, VICTIM, "used-1", used, stranger=True) == "1202"
        other_code = await request_otp(run, smtp, OTHER, "other-1")
        for _ in range(6):  # another receiver's reference, with any code
            assert await verify(run, VICTIM, "other-1", "000000", stranger=True) == "1202"
        # Neither receiver is locked out, and the other's OTP was not burned.
        fresh = await request_otp(run, smtp, VICTIM, "login-2")
        assert await verify(run, VICTIM, "login-2", fresh) == "0000"
        assert await verify(run, OTHER, "other-1", other_code) == "0000"
    finally:
        await run.daemon.stop()


async def test_wrong_codes_for_the_receivers_own_otps_still_count(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    run = await start(tmp_path, smtp, session, "verify_failures_max = 3")
    try:
        codes = []
        for i in range(2):  # wrong codes across two real OTPs of the receiver
            code = await request_otp(run, smtp, VICTIM, f"real-{i}")
            wrong = "000000" if code != "000000" else "111111"
            codes += [await verify(run, VICTIM, f"real-{i}", wrong, stranger=True)
                      for _ in range(2)]
        assert codes == ["1202", "1202", "1202", "1401"]
        code = await request_otp(run, smtp, VICTIM, "real-2")
        assert await verify(run, VICTIM, "real-2", code) == "1401"  # locked, as designed
    finally:
        await run.daemon.stop()
