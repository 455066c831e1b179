"""With ``signing_key``, every envelope is signed so that a daemon broker table
with ``require_signature = true`` executes it; unsigned or badly signed: not
executed and not answered (ReplyTimeout). The client takes only replies
signed with its key."""

from __future__ import annotations

import json

import pytest

from otpd.client.envelope import encode, envelope
from otpd.client.errors import ReplyTimeout
from otpd.wire.protocol import parse_request
from otpd.wire.signing import SignatureError, verify
from tests.support.client_config import phone
from tests.support.gateway import MakeGateway

KEY = "a-shared-signing-key-0123456789abcdef"
OTHER_KEY = "not-the-key-at-all-0123456789abcdef"  # >= 32 bytes, as the daemon requires


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
    wrong = gw.client(client=f'wait_result = true\nsigning_key = "{OTHER_KEY}"')
    number = phone()
    for client in (unsigned, wrong):
        with pytest.raises(ReplyTimeout):  # refused unanswered
            await client.send_sms(number, "forged", 60, timeout=1.5)
    r = await signed.send_sms(number, "signed", 60)
    assert r.response_code == "0000", r
    # The daemon takes commands in order: the refused ones were never sent.
    assert await gw.sms_text(number[1:]) == "signed" and len(gw.sms_to(number[1:])) == 1
    assert (await signed.get_modem_list()).ok


async def test_a_client_with_another_key_takes_no_reply(make_gateway: MakeGateway) -> None:
    """The daemon signs its replies with its key even where it does not require
    signatures: a client with another key cannot tell them from forgeries."""
    gw = await make_gateway("redis", f'signing_key = "{KEY}"\n')
    wrong = gw.client(client=f'signing_key = "{OTHER_KEY}"')
    with pytest.raises(ReplyTimeout, match=r"ignored.*signature: does not match"):
        await wrong.verify_otp(phone(), "123456", "some-reference", timeout=2.0)
    right = gw.client(client=f'signing_key = "{KEY}"')
    assert (await right.verify_otp(phone(), "123456", "some-reference")).response_code == "1202"
