"""Abuse limits over real HTTP: 1401 + HTTP 429 with Retry-After, 1400 for
numbers outside the allowed ranges (the home country's only, by default), and
limits that survive a restart; the [limits] settings."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import aiohttp
import pytest

from otpd.app.daemon import StoreSimQuota
from otpd.app.settings import parse_settings
from otpd.channels.sms.quota import QuotaError
from otpd.limits import Limiter, LimitSettings
from otpd.store import Store, StoreError
from tests.support.daemon import start_daemon, write_config
from tests.support.mail import SmtpServer


def email(i: int) -> str:
    return f"user{i}@example.org"


async def test_receiver_cooldown_and_window_survive_restart(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port, limits="""
        receiver_cooldown = 30
        receiver_max = 3
    """)
    run = await start_daemon(config, session)
    try:
        status, body = await run.client.call("request-otp", {
            "receiver": email(1), "reference": "a", "message": "%s"})
        assert status == 200 and body["response_code"] == "0000"
        status, body = await run.client.call("request-otp", {
            "receiver": email(1), "reference": "b", "message": "%s"})
        assert status == 429 and body["response_code"] == "1401"
        assert 25 <= body["data"]["retry_after"] <= 30
        # A repeat of the accepted reference is still reported as a duplicate.
        _, body = await run.client.call("request-otp", {
            "receiver": email(1), "reference": "a", "message": "%s"})
        assert body["response_code"] == "1201"
        # Other receivers are not affected.
        _, body = await run.client.call("send-email", {
            "receiver": email(2), "subject": "s", "message": "m"})
        assert body["response_code"] == "0000"
    finally:
        await run.daemon.stop()
    run = await start_daemon(config, session)
    try:
        status, body = await run.client.call("request-otp", {
            "receiver": email(1), "reference": "c", "message": "%s"})
        assert status == 429 and body["response_code"] == "1401"  # held across the restart
    finally:
        await run.daemon.stop()
    assert len(smtp.sink.messages) == 2


async def test_receiver_window(tmp_path: Path, smtp: SmtpServer,
                               session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port, limits="""
        receiver_cooldown = 0
        receiver_max = 2
    """)
    run = await start_daemon(config, session)
    try:
        codes = []
        for i in range(3):
            _, body = await run.client.call("send-email", {
                "receiver": email(3), "subject": "s", "message": f"m{i}"})
            codes.append(body["response_code"])
        assert codes == ["0000", "0000", "1401"]
    finally:
        await run.daemon.stop()


async def test_prefix_allow_and_deny_lists(tmp_path: Path,
                                           session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, limits="""
        allow_prefixes = ["+62"]
        deny_prefixes = ["0809"]
    """)
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("send-sms", {"receiver": "+14155550100", "message": "m"})
        assert body["response_code"] == "1400"
        _, body = await run.client.call("request-otp", {
            "receiver": "08091234567", "reference": "x", "message": "%s"})
        assert body["response_code"] == "1400"  # premium range, local form in the config
        _, body = await run.client.call("send-sms", {"receiver": "08121234567", "message": "m"})
        assert body["response_code"] == "1000"  # allowed; this daemon just has no modem
    finally:
        await run.daemon.stop()


async def test_guessing_references_is_limited_per_client(
        tmp_path: Path, smtp: SmtpServer, session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port, limits="""
        receiver_cooldown = 0
        verify_failures_max = 3
        client_verify_failures_max = 4
    """)
    run = await start_daemon(config, session)
    try:
        codes = []
        # Made-up references across receivers: the client is throttled, whatever
        # the receiver (the receivers are not: tests/test_verify_lockout.py).
        for i in range(6):
            _, body = await run.client.call("verify-otp", {
                "receiver": email(4 + i % 2), "reference": f"guess-{i}", "otp": "000000"})
            codes.append(body["response_code"])
        assert codes == ["1202"] * 4 + ["1401"] * 2
        assert "too many failed verifications" in body["message"]
        assert 590 <= body["data"]["retry_after"] <= 600
    finally:
        await run.daemon.stop()
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("verify-otp", {
            "receiver": email(6), "reference": "guess-7", "otp": "000000"})
        assert body["response_code"] == "1401"  # held across the restart (the store)
    finally:
        await run.daemon.stop()


async def test_only_home_country_numbers_by_default(tmp_path: Path,
                                                   session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, limits="enabled = true")  # country_code = "62"
    run = await start_daemon(config, session)
    try:
        status, body = await run.client.call("request-otp", {
            "receiver": "+12025550123", "reference": "us", "message": "%s"})
        assert (status, body["response_code"]) == (200, "1400")
        assert "limits.allow_prefixes" in body["message"] and "+62" in body["message"]
        _, body = await run.client.call("request-otp", {
            "receiver": "08121234567", "reference": "id", "message": "%s"})
        assert body["response_code"] == "1000"  # allowed; this daemon just has no modem
    finally:
        await run.daemon.stop()


async def test_an_empty_allow_list_written_out_serves_every_number(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, limits="allow_prefixes = []")
    run = await start_daemon(config, session)
    try:
        _, body = await run.client.call("request-otp", {
            "receiver": "+12025550123", "reference": "us", "message": "%s"})
        assert body["response_code"] == "1000"  # accepted; no modem here
    finally:
        await run.daemon.stop()


def parsed_limits(text: str) -> LimitSettings:
    return parse_settings(f"[limits]\n{text}\n" if text else "").limits


def test_allow_prefixes_setting() -> None:
    assert parsed_limits("").allow_prefixes is None  # no [limits] table at all
    assert parsed_limits("enabled = true").allow_prefixes is None
    assert parsed_limits("allow_prefixes = []").allow_prefixes == ()
    assert parsed_limits('allow_prefixes = ["0812", "+1"]').allow_prefixes == ("+62812", "+1")
    limits = parsed_limits('client_verify_failures_max = 7\nclient_verify_window = 60')
    assert (limits.client_verify_failures_max, limits.client_verify_window) == (7, 60.0)
    assert (LimitSettings().client_verify_failures_max,
            LimitSettings().client_verify_window) == (30, 600.0)


def test_receiver_refusals_name_their_setting() -> None:
    home = Limiter(LimitSettings(), cast(Store, None))
    assert home.receiver_refusal("+628121234567", "62") is None
    assert home.receiver_refusal("someone@example.org", "62") is None
    why = home.receiver_refusal("+12025550123", "62")
    assert why is not None and "limits.allow_prefixes" in why and "+62" in why
    everyone = Limiter(LimitSettings(allow_prefixes=(), deny_prefixes=("+62809",)),
                       cast(Store, None))
    assert everyone.receiver_refusal("+12025550123", "62") is None
    why = everyone.receiver_refusal("+628091234567", "62")
    assert why is not None and "limits.deny_prefixes" in why
    listed = Limiter(LimitSettings(allow_prefixes=("+1",)), cast(Store, None))
    assert listed.receiver_refusal("+12025550123", "62") is None
    why = listed.receiver_refusal("+628121234567", "62")
    assert why is not None and "limits.allow_prefixes" in why and "+1" in why


async def test_failed_logins_are_throttled_per_address(tmp_path: Path,
                                                       session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, limits="""
        auth_failures_max = 3
        auth_window = 60
    """)
    run = await start_daemon(config, session)
    try:
        statuses = []
        for _ in range(4):
            status, body = await run.client.call("echo", {}, password="guess")
            statuses.append((status, body["response_code"]))
        assert statuses == [(401, "1100")] * 3 + [(429, "1401")]
        # Even the right password is refused from this address for now.
        status, body = await run.client.call("echo", {})
        assert status == 429 and body["response_code"] == "1401"
    finally:
        await run.daemon.stop()


async def test_per_user_and_distinct_receivers(tmp_path: Path, smtp: SmtpServer,
                                               session: aiohttp.ClientSession) -> None:
    config = write_config(tmp_path, smtp_port=smtp.port, limits="""
        receiver_cooldown = 0
        user_distinct_receivers_daily = 3
        user_max = 8
        user_window = 60
    """)
    run = await start_daemon(config, session)
    try:
        codes = []
        for i in range(4):  # SMS pumping: one user, ever new receivers
            _, body = await run.client.call("send-email", {
                "receiver": email(10 + i), "subject": "s", "message": "m"})
            codes.append(body["response_code"])
        assert codes == ["0000", "0000", "0000", "1401"]
        for _ in range(4):
            status, body = await run.client.call("echo", {})
        assert status == 200
        status, body = await run.client.call("echo", {})
        assert status == 429 and body["response_code"] == "1401"  # 9th command this minute
    finally:
        await run.daemon.stop()


class _StoreDown:
    async def wait(self, sim: str, now: float) -> float:
        raise StoreError("database is locked")

    async def record(self, sim: str, parts: int, now: float) -> float:
        raise StoreError("database is locked")


async def test_the_pool_sees_a_store_failure_as_its_own_quota_error() -> None:
    # The modem pool knows nothing of the store: the daemon's adapter translates.
    quota = StoreSimQuota(_StoreDown())
    with pytest.raises(QuotaError, match="locked"):
        await quota.wait("sim", 0.0)
    with pytest.raises(QuotaError, match="locked"):
        await quota.record("sim", 1, 0.0)
