"""With ``signing_key``, every envelope is signed so that a daemon broker table
with ``require_signature = true`` executes it; unsigned or badly signed: 1100."""

from __future__ import annotations

import json

import pytest

from otpd.client.envelope import encode, envelope
from otpd.wire.protocol import parse_request
from otpd.wire.signing import SignatureError, verify
from tests.support.client_config import phone
from tests.support.gateway import MakeGateway

KEY = "a-shared-signing-key-0123456789"


def test_encoded_envelope_is_signed_and_parses() -> None:
    env = envelope("send-sms", {"date_time": 1, "receiver": "0812", "message": "Kode ✓ 1"})
    body = encode(env, callback_topic="otp-reply-x", callback_delay=50, signing_key=KEY)
    obj = json.loads(body)
    verify(obj, KEY)  # raises if not
    assert obj["callback_topic"] == "otp-reply-x" and obj["callback_delay"] == 50
    parsed = parse_request(body)
    assert parsed.callback_topic == "otp-reply-x" and parsed.callback_delay_ms == 50
    with pytest.raises(SignatureError):
        verify(obj, "another key")
    assert "signature" not in json.loads(encode(env))


@pytest.mark.parametrize("method", ["redis", "amqp"])
async def test_daemon_requiring_signatures(method: str, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(method, f'require_signature = true\nsigning_key = "{KEY}"\n')
    signed = gw.client(client=f'wait_result = true\nsigning_key = "{KEY}"')
    unsigned = gw.client(client="wait_result = true")
    wrong = gw.client(client='wait_result = true\nsigning_key = "not-the-key-at-all"')
    number = phone()
    r = await signed.send_sms(number, "signed", 60)
    assert r.response_code == "0000", r
    assert await gw.sms_text(number[1:]) == "signed"
    for client in (unsigned, wrong):
        r = await client.send_sms(number, "forged", 60)
        assert r.response_code == "1100" and "signature" in (r.message or ""), r
    assert (await signed.get_modem_list()).ok
