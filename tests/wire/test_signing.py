"""Nonces, replay keys and reply signatures (pure); the command scheme itself is
covered in tests/transports/test_signing.py."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from otpd.wire.signing import (
    IN_REPLY_TO_FIELD,
    NONCE_FIELD,
    SignatureError,
    canonical_bytes,
    replay_key,
    sign,
    sign_event,
    sign_reply,
    verify,
    verify_event,
    verify_reply,
)

KEY = "shared-key"
NOW = 1_700_000_000
ENV: dict[str, Any] = {"command": "verify-otp", "callback_topic": "otp-reply-1",
                       "data": {"receiver": "0812", "reference": "r1", "otp": "123456"}}
REPLY: dict[str, Any] = {"command": "verify-otp", "response_code": "1202",
                         "data": {"date_time": NOW, "receiver": "0812", "reference": "r1"},
                         "message": "invalid OTP"}


def test_every_signed_command_gets_a_fresh_nonce_covered_by_the_signature() -> None:
    a, b = sign(ENV, KEY, now=NOW), sign(ENV, KEY, now=NOW)
    assert isinstance(a[NONCE_FIELD], str) and len(a[NONCE_FIELD]) == 32
    assert a[NONCE_FIELD] != b[NONCE_FIELD]
    assert a["signature"] != b["signature"]  # same command, same second: two commands
    verify(a, KEY, now=NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify({**a, NONCE_FIELD: b[NONCE_FIELD]}, KEY, now=NOW)


def test_a_nonce_already_there_is_kept() -> None:
    signed = sign({**ENV, NONCE_FIELD: "from-the-app"}, KEY, now=NOW)
    assert signed[NONCE_FIELD] == "from-the-app"
    verify(signed, KEY, now=NOW)
    assert NONCE_FIELD not in ENV  # sign() copies


def test_replay_key_is_the_normalised_signature() -> None:
    signed = sign(ENV, KEY, now=NOW)
    assert replay_key(signed) == signed["signature"]
    shouted = {**signed, "signature": f"  {signed['signature'].upper()}\n"}
    verify(shouted, KEY, now=NOW)  # accepted as the same command...
    assert replay_key(shouted) == replay_key(signed)  # ...so remembered under the same key
    assert replay_key(sign(ENV, KEY, now=NOW)) != replay_key(signed)
    for unsigned in (ENV, {**ENV, "signature": "  "}, {**ENV, "signature": 5}):
        with pytest.raises(SignatureError, match="missing"):
            replay_key(unsigned)


def test_reply_scheme_is_domain_separated_hmac_bound_to_the_request() -> None:
    request = sign(ENV, KEY, now=NOW)
    reply = sign_reply(REPLY, request["signature"], KEY)
    assert reply[IN_REPLY_TO_FIELD] == request["signature"]
    assert "signature" not in REPLY and IN_REPLY_TO_FIELD not in REPLY  # a copy
    expected = hmac.new(KEY.encode(), b"otpd-reply\n" + canonical_bytes(reply),
                        hashlib.sha256).hexdigest()
    assert reply["signature"] == expected
    verify_reply(json.loads(json.dumps(reply)), request["signature"], KEY)
    verify_reply({**reply, "signature": expected.upper()}, request["signature"], KEY.encode())


def test_unsigned_request_binds_to_the_empty_signature() -> None:
    reply = sign_reply(REPLY, "", KEY)
    assert reply[IN_REPLY_TO_FIELD] == ""
    verify_reply(reply, "", KEY)
    with pytest.raises(SignatureError, match="another command"):
        verify_reply(reply, "ab" * 32, KEY)


@pytest.mark.parametrize(("change", "reason"), [
    ({"signature": None}, "missing"),
    ({"signature": ""}, "missing"),
    ({IN_REPLY_TO_FIELD: None}, "in_reply_to: missing"),
    ({IN_REPLY_TO_FIELD: 7}, "in_reply_to: missing"),
    ({"response_code": "0000"}, "does not match"),
    ({"data": {**REPLY["data"], "reference": "r2"}}, "does not match"),
    ({"signature": "é" * 64}, "does not match"),
])
def test_reply_refused(change: dict[str, Any], reason: str) -> None:
    request = sign(ENV, KEY, now=NOW)
    reply = {**sign_reply(REPLY, request["signature"], KEY), **change}
    reply = {k: v for k, v in reply.items() if v is not None}
    with pytest.raises(SignatureError, match=reason):
        verify_reply(reply, request["signature"], KEY)


def test_reply_to_another_command_or_with_another_key_is_refused() -> None:
    first, second = sign(ENV, KEY, now=NOW), sign(ENV, KEY, now=NOW)
    reply = sign_reply(REPLY, first["signature"], KEY)
    with pytest.raises(SignatureError, match="another command"):
        verify_reply(reply, second["signature"], KEY)  # a real reply, replayed to another request
    with pytest.raises(SignatureError, match="does not match"):
        verify_reply(reply, first["signature"], "other-key")
    # Re-binding a captured reply to another request breaks its signature.
    with pytest.raises(SignatureError, match="does not match"):
        verify_reply({**reply, IN_REPLY_TO_FIELD: second["signature"]}, second["signature"], KEY)


def test_a_signed_reply_never_verifies_as_a_command() -> None:
    # A block-msisdn reply has a command's shape; give it a timestamp too.
    shaped: dict[str, Any] = {"command": "block-msisdn", "response_code": "0000",
                              "data": {"date_time": NOW, "receiver": "0812"},
                              "timestamp": NOW, NONCE_FIELD: "n"}
    reply = sign_reply(shaped, "", KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify(reply, KEY, now=NOW)
    # ...and a signed command never verifies as a reply.
    command = sign({**ENV, IN_REPLY_TO_FIELD: ""}, KEY, now=NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify_reply(command, "", KEY)


EVENT: dict[str, Any] = {"event": "delivery", "id": 7, "reference": "r1",
                         "receiver": "+*********567", "state": "delivered", "channel": "sms",
                         "modem": "a", "sent_at": NOW, "delivered_at": NOW + 5,
                         "reported_at": NOW + 6}


def test_event_scheme_is_domain_separated_hmac() -> None:
    signed = sign_event(EVENT, KEY)
    expected = hmac.new(KEY.encode(), b"otpd-event\n" + canonical_bytes(EVENT),
                        hashlib.sha256).hexdigest()
    assert signed["signature"] == expected and signed == {**EVENT, "signature": expected}
    verify_event(json.loads(json.dumps(signed)), KEY)  # survives a JSON round trip
    verify_event({**signed, "signature": expected.upper()}, KEY)


def test_event_refused_when_changed_unsigned_or_keyed_otherwise() -> None:
    signed = sign_event(EVENT, KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify_event({**signed, "state": "undeliverable"}, KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify_event(signed, "other-key")
    with pytest.raises(SignatureError, match="missing"):
        verify_event(EVENT, KEY)


def test_events_commands_and_replies_never_pass_for_one_another() -> None:
    # An event shaped like a command (and with a timestamp) is not a command...
    shaped: dict[str, Any] = {**ENV, "timestamp": NOW, NONCE_FIELD: "n",
                              IN_REPLY_TO_FIELD: ""}
    event = sign_event(shaped, KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify(event, KEY, now=NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify_reply(event, "", KEY)
    # ...and neither a signed command nor a signed reply is an event.
    with pytest.raises(SignatureError, match="does not match"):
        verify_event(sign(shaped, KEY, now=NOW), KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify_event(sign_reply(REPLY, "", KEY), KEY)
