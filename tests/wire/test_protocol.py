from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpd.wire.codes import Code
from otpd.wire.protocol import (
    BlockMsisdn,
    ProtocolError,
    RequestOtp,
    Response,
    SendEmail,
    SendSms,
    VerifyOtp,
    check_template,
    parse_request,
    render_template,
)


def req(command: str, **data: object) -> bytes:
    return json.dumps({"command": command, "data": data}).encode()


def test_seed_request_otp_parses() -> None:
    env = parse_request(req(
        "request-otp", date_time=1629685778, expiration=1629685838, receiver="08126666666",
        message="Your OTP is %s", reference="12345678901234567890", param1="100000",
        param2="1234567890", param3="987654", param4="674527846556468254"))
    cmd = env.command
    assert isinstance(cmd, RequestOtp)
    assert cmd.params == ("100000", "1234567890", "987654", "674527846556468254")
    assert cmd.expiration == 1629685838
    assert cmd.date_time == 1629685778


def test_loose_types_from_otp_publisher() -> None:
    env = parse_request(json.dumps({
        "command": "verify-otp", "callback_topic": "cb", "callback_delay": "50",
        "data": {"receiver": "0812", "otp": 123456, "reference": 99, "param1": 100000,
                 "date_time": "1629685778"}}))
    cmd = env.command
    assert isinstance(cmd, VerifyOtp)
    assert (cmd.otp, cmd.reference, cmd.params[0], cmd.date_time) == ("123456", "99", "100000",
                                                                        1629685778)
    assert env.callback_topic == "cb" and env.callback_delay_ms == 50


def test_send_mail_alias_and_msisdn_alias() -> None:
    env = parse_request(req("send-mail", receiver="a@b.co", subject="s", message="m", id=5))
    assert isinstance(env.command, SendEmail) and env.name == "send-mail"
    assert env.command.id == "5"
    env = parse_request(req("block-msisdn", msisdn="0812"))
    assert isinstance(env.command, BlockMsisdn) and env.command.receiver == "0812"


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"", Code.INVALID_REQUEST, "empty"),
        (b"{nope", Code.INVALID_REQUEST, "not valid JSON"),
        (b"\xff\xfe", Code.INVALID_REQUEST, "UTF-8"),
        (b"[1,2]", Code.INVALID_REQUEST, "JSON object"),
        (b'{"data":{}}', Code.INVALID_REQUEST, "command"),
        (req("launch-rocket"), Code.UNKNOWN_COMMAND, "unknown command"),
        (b'{"command":"send-sms","data":[1]}', Code.INVALID_REQUEST, "data:"),
        (req("send-sms", message="x"), Code.INVALID_REQUEST, "data.receiver"),
        (req("send-sms", receiver="0812", message=5), Code.INVALID_REQUEST, "data.message"),
        (req("send-sms", receiver="0812", message="m", expiration="soon"), Code.INVALID_REQUEST,
         "data.expiration"),
        (req("send-sms", receiver="0812", message="m", expiration=True), Code.INVALID_REQUEST,
         "data.expiration"),
        (req("request-otp", receiver="0812", reference="r", message="no placeholder"),
         Code.INVALID_REQUEST, "data.message"),
        (req("request-otp", receiver="0812", reference="r", message="%s and %s"),
         Code.INVALID_REQUEST, "data.message"),
        (req("request-otp", receiver="0812", reference="r", message="%d %s"),
         Code.INVALID_REQUEST, "data.message"),
        (req("request-otp", receiver="0812", message="%s"), Code.INVALID_REQUEST,
         "data.reference"),
        (req("send-sms", receiver="0812", message="m", id=1.5), Code.INVALID_REQUEST, "data.id"),
        (b'{"command":"send-sms","data":{"receiver":"0812","message":"m","expiration":NaN}}',
         Code.INVALID_REQUEST, "JSON"),
    ],
)
def test_bad_requests_name_the_field(body: bytes, code: Code, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(body)
    assert info.value.code == code
    assert fragment in info.value.message


def test_template_rules() -> None:
    check_template("Your code is %s (100%% safe)")
    assert render_template("Code %s, 100%% sure", "123456") == "Code 123456, 100% sure"
    assert render_template("%%s is not it: %s", "42") == "%s is not it: 42"
    with pytest.raises(ProtocolError):
        check_template("trailing %")


def test_response_shape() -> None:
    body = Response("send-sms", Code.SUCCESS, {"date_time": 1}).to_json()
    assert body == {"command": "send-sms", "response_code": "0000", "data": {"date_time": 1}}
    body = Response("send-sms", Code.FAILED, {}, "why").to_json()
    assert body["message"] == "why" and body["response_code"] == "1102"


def test_send_sms_keeps_message_whitespace() -> None:
    env = parse_request(req("send-sms", receiver=" 0812 ", message="  hi  "))
    assert isinstance(env.command, SendSms)
    assert env.command.receiver == "0812" and env.command.message == "  hi  "


@given(st.binary(max_size=300))
def test_parser_never_raises_unexpected_exceptions(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(data)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                       children, max_size=4),
    max_leaves=20,
), st.sampled_from(["request-otp", "verify-otp", "send-sms", "send-email", "send-message",
                    "block-msisdn", "unblock-msisdn", "echo", "get-modem-list", "request-ussd"]))
def test_any_json_data_gives_command_or_protocol_error(data: object, command: str) -> None:
    raw = json.dumps({"command": command, "data": data})
    try:
        parse_request(raw)
    except ProtocolError as exc:
        assert exc.code in (Code.INVALID_REQUEST, Code.UNKNOWN_COMMAND)
