"""The envelope signature scheme (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from otpd.wire.signing import SignatureError, canonical_bytes, sign, verify

NOW = 1_700_000_000
ENV = {"command": "send-sms", "callback_topic": "cb/1", "nonce": "n1",
       "data": {"receiver": "0812", "message": "Kode é %s", "id": 7}}


def test_scheme_is_hmac_sha256_of_sorted_compact_json_without_signature() -> None:
    signed = sign(ENV, "key", now=NOW)
    assert signed["timestamp"] == NOW
    canonical = ('{"callback_topic":"cb/1","command":"send-sms","data":{"id":7,'
                 '"message":"Kode é %s","receiver":"0812"},"nonce":"n1","timestamp":1700000000}')
    assert canonical_bytes(signed) == canonical.encode("utf-8")
    expected = hmac.new(b"key", canonical.encode("utf-8"), hashlib.sha256).hexdigest()
    assert signed["signature"] == expected
    verify(json.loads(json.dumps(signed)), "key", now=NOW + 299)
    verify({**signed, "signature": expected.upper()}, b"key", now=NOW)


@pytest.mark.parametrize(("change", "now", "reason"), [
    ({"signature": None}, NOW, "missing"),
    ({"timestamp": "1700000000"}, NOW, "timestamp"),
    ({"command": "send-email"}, NOW, "does not match"),
    ({"signature": "é" * 64}, NOW, "does not match"),
    ({}, NOW + 301, "timestamp"),
    ({}, NOW - 301, "timestamp"),
])
def test_refused(change: dict[str, object], now: int, reason: str) -> None:
    signed = {**sign(ENV, "key", now=NOW), **change}
    signed = {k: v for k, v in signed.items() if v is not None}
    with pytest.raises(SignatureError, match=reason):
        verify(signed, "key", now=now)


def test_wrong_key_and_error_text_never_holds_the_key() -> None:
    with pytest.raises(SignatureError) as info:
        verify(sign(ENV, "right-key", now=NOW), "other-key", now=NOW)
    assert "key" not in str(info.value).replace("signature", "")
