"""Which callback topics a consumer answers on (pure)."""

from __future__ import annotations

import pytest

from otpd.wire.reply_topics import MAX_REPLY_TOPIC_CHARS, ReplyTopicRules

RULES = ReplyTopicRules.build(["sms", "otp/commands"], ["otpd:"])


@pytest.mark.parametrize("topic", [
    "otp-reply-6f1c2a7e-9b1d-4c1e-8d0e-0a1b2c3d4e5f",  # otpd.client
    "modem-list-a1b2c3", "ussd-x9y8z7",  # OTP-Publisher
    "replies/app-1/42", "app:reply:1", "a" * MAX_REPLY_TOPIC_CHARS,
    "OTPD:blocklist",  # Redis keys are case-sensitive: not the store's
])
def test_allowed(topic: str) -> None:
    assert RULES.refusal(topic) is None


@pytest.mark.parametrize(("topic", "why"), [
    ("", "1..200"),
    ("a" * (MAX_REPLY_TOPIC_CHARS + 1), "1..200"),
    ("otpd:blocklist:set", "reserved key prefix"),
    ("otpd:otp:tx-1", "reserved key prefix"),
    ("otpd:rate:send:x", "reserved key prefix"),
    ("sms", "command topic"),
    ("otp/commands", "command topic"),
    ("replies/#", "only letters"),
    ("replies/+/x", "only letters"),
    ("$SYS/broker", "only letters"),
    ("$share/g/sms", "only letters"),
    ("a b", "only letters"),
    ("reply\r\nX-Injected: 1", "only letters"),
    ("reply\x00", "only letters"),
    ("r\u00e9ply", "only letters"),
    ("a/../b", "'..'"),
    ("queue*", "only letters"),
])
def test_refused(topic: str, why: str) -> None:
    reason = RULES.refusal(topic)
    assert reason is not None and why in reason


def test_empty_prefixes_are_ignored() -> None:
    assert ReplyTopicRules.build(["sms"], ["", "otp:"]).reserved_prefixes == ("otp:",)
