"""The Sans-I/O AT parser and command builder, without any device."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otpd.channels.sms.at import (
    AtParser,
    AtSyntaxError,
    Event,
    FinalKind,
    Prompt,
    Reply,
    Stray,
    Urc,
    check_command,
    command,
    encode_command,
    encode_pdu,
    parse_final,
    quote,
)


def run(parser: AtParser, data: bytes, *, chunk: int | None = None) -> list[Event]:
    if chunk is None:
        return parser.feed(data)
    events: list[Event] = []
    for i in range(0, len(data), chunk):
        events += parser.feed(data[i : i + chunk])
    return events


def replies(events: list[Event]) -> list[Reply]:
    return [e for e in events if isinstance(e, Reply)]


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_echo_on_is_not_part_of_the_reply(chunk: int | None) -> None:
    p = AtParser()
    p.begin("AT+CSQ")
    events = run(p, b"AT+CSQ\r\r\n+CSQ: 18,99\r\n\r\nOK\r\n", chunk=chunk)
    assert events == [Reply("AT+CSQ", ("+CSQ: 18,99",), parse_final("OK"))]  # type: ignore[arg-type]
    assert not p.busy


def test_double_echo_and_echo_off() -> None:
    p = AtParser()
    p.begin("ATE0")
    (reply,) = p.feed(b"ATE0\rATE0\r\r\nOK\r\n")
    assert isinstance(reply, Reply) and reply.ok and reply.lines == ()
    p.begin("AT+CGMI")
    (reply,) = p.feed(b"\r\nhuawei\r\n\r\nOK\r\n\r\n\r\n")  # Huawei: extra blank lines
    assert isinstance(reply, Reply) and reply.lines == ("huawei",)


@pytest.mark.parametrize(
    ("line", "kind", "code", "meaning"),
    [
        ("OK", FinalKind.OK, None, "OK"),
        ("ERROR", FinalKind.ERROR, None, "ERROR"),
        ("+CME ERROR: 14", FinalKind.CME, 14, "SIM busy"),
        ("+CME ERROR: 16", FinalKind.CME, 16, "incorrect password"),
        ("+CMS ERROR: 330", FinalKind.CMS, 330, "SMSC address unknown"),
        ("+CMS ERROR:500", FinalKind.CMS, 500, "unknown error"),
        ("+CMS ERROR: Unknown error", FinalKind.CMS, 500, "unknown error"),
        ("+CME ERROR: SIM busy", FinalKind.CME, 14, "SIM busy"),
        ("+CME ERROR: something odd", FinalKind.CME, None, "+CME ERROR: something odd"),
        ("COMMAND NOT SUPPORT", FinalKind.VENDOR, None, "COMMAND NOT SUPPORT"),
        ("TOO MANY PARAMETERS", FinalKind.VENDOR, None, "TOO MANY PARAMETERS"),
        ("MODEM ERROR: 3", FinalKind.VENDOR, None, "MODEM ERROR: 3"),
    ],
)
def test_final_result_codes(line: str, kind: FinalKind, code: int | None, meaning: str) -> None:
    final = parse_final(line)
    assert final is not None
    assert (final.kind, final.code, final.meaning) == (kind, code, meaning)
    assert final.ok == (kind is FinalKind.OK)


def test_information_lines_are_not_finals() -> None:
    for line in ("+CSQ: 18,99", "OKAY", "huawei", "+CMGS: 5", "ERRORS"):
        assert parse_final(line) is None


@pytest.mark.parametrize(
    "prompt", [b"\r\n> ", b"\r\n>\r\n", b"> \r\n", b">", b"\r\n>  "], ids=repr
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_prompt_variants(prompt: bytes, chunk: int | None) -> None:
    p = AtParser()
    p.begin("AT+CMGS=20", expect_prompt=True)
    events = run(p, b"AT+CMGS=20\r" + prompt, chunk=chunk)
    assert events == [Prompt()]
    p.expect_echo("0011")
    events = run(p, b"0011\x1a\r\n+CMGS: 7\r\n\r\nOK\r\n", chunk=chunk)
    (reply,) = replies(events)
    assert reply.ok and reply.prefixed("+CMGS:") == ["7"]


def test_urcs_anywhere_go_to_events_not_into_the_reply() -> None:
    p = AtParser()
    p.begin("AT+CMGS=20", expect_prompt=True)
    events = p.feed(b'\r\n+ZDONR: "X",1\r\n+CMTI: "SM",1\r\n^RSSI:17\r\n> ')
    assert events == [Urc('+ZDONR: "X",1'), Urc('+CMTI: "SM",1'), Urc("^RSSI:17"), Prompt()]
    events = p.feed(b'\r\n+ZPASR: "UMTS"\r\n+CMGS: 4\r\nRING\r\n\r\nOK\r\n')
    assert events[:2] == [Urc('+ZPASR: "UMTS"'), Urc("RING")]
    assert events[2] == Reply("AT+CMGS=20", ("+CMGS: 4",), parse_final("OK"))  # type: ignore[arg-type]


def test_own_prefix_is_a_reply_line_but_the_same_text_outside_is_a_urc() -> None:
    p = AtParser()
    p.begin("AT+CREG?")
    (reply,) = p.feed(b"\r\n+CREG: 2,1,4CA,81DE445\r\n\r\nOK\r\n")
    assert isinstance(reply, Reply) and reply.prefixed("+CREG:") == ["2,1,4CA,81DE445"]
    assert p.feed(b"\r\n+CREG: 1, E006B, ABE0016\r\n") == [Urc("+CREG: 1, E006B, ABE0016")]


def test_two_line_urcs_carry_their_body() -> None:
    p = AtParser()
    body = "07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07"
    events = p.feed(b"\r\n+CMT: ,24\r\n" + body.encode() + b"\r\n")
    assert events == [Urc("+CMT: ,24", body)]
    assert p.feed(b"\r\n+CDS:25\r\n0006\r\n") == [Urc("+CDS:25", "0006")]
    text_mode = b'\r\n+CDS: 6,5,"+123",145,"13/01/01,00:00:00+00","13/01/01,00:00:01+00",0\r\n'
    assert len(p.feed(text_mode)) == 1


def test_cancel_returns_lines_without_final() -> None:
    p = AtParser()
    p.begin("AT+CPIN?")
    assert p.feed(b"\r\n+CPIN: READY\r\n") == []  # Wavecom: no OK follows
    assert p.cancel() == ["+CPIN: READY"]
    assert p.feed(b"\r\nOK\r\n") == [Stray("OK")]  # a late OK belongs to nothing


def test_garbage_is_survivable() -> None:
    p = AtParser()
    events = p.feed(b"\x00\x00\xff\xfe\r\nhello\r\n")
    assert events == [Stray("\ufffd\ufffd"), Stray("hello")]  # NULs dropped, bad UTF-8 replaced
    p.begin("AT")
    (reply,) = p.feed(b"\r\nOK\r\n")
    assert isinstance(reply, Reply) and reply.ok
    p.feed(b"x" * 5000)  # no line end ever: bounded buffer
    p.begin("AT")
    events = p.feed(b"\r\nOK\r\n")
    assert replies(events) and replies(events)[0].ok


def test_only_one_exchange_at_a_time() -> None:
    p = AtParser()
    p.begin("AT")
    with pytest.raises(RuntimeError):
        p.begin("AT")


# --- building commands ------------------------------------------------------------


def test_command_builder_quotes_and_numbers() -> None:
    assert command("+CMGS", 23) == "AT+CMGS=23"
    assert command("+CPMS", "SM", "SM", "SM") == 'AT+CPMS="SM","SM","SM"'
    assert command("+CUSD", 1, "*888#", 15) == 'AT+CUSD=1,"*888#",15'
    assert command("+CSQ") == "AT+CSQ"
    assert command("+CMGL", None, 4) == "AT+CMGL=,4"
    assert encode_command("AT+CSQ") == b"AT+CSQ\r"


@pytest.mark.parametrize(
    "evil",
    ['12"\rAT+CMGD=1,4', "1\nATZ", "x\x1a", "x\x1b", 'a"b', "\x00", "é"],
    ids=repr,
)
def test_arguments_cannot_inject_commands(evil: str) -> None:
    with pytest.raises(AtSyntaxError):
        quote(evil)
    with pytest.raises(AtSyntaxError):
        command("+CPIN", evil)


@pytest.mark.parametrize(
    "line", ["ATZ\rAT+CMGD=1,4", "AT+CSQ\n", "CSQ", 'AT+X="a', "AT" + "A" * 600, "AT\x1a"]
)
def test_bad_command_lines_are_refused(line: str) -> None:
    with pytest.raises(AtSyntaxError):
        check_command(line)


def test_pdu_payload_must_be_hex() -> None:
    assert encode_pdu("0011") == b"0011\x1a"
    for bad in ("0011\x1a", "00 11", "001", "zz", "", "0011\r\nATZ"):
        with pytest.raises(AtSyntaxError):
            encode_pdu(bad)


# --- properties ---------------------------------------------------------------------

TRANSCRIPT = (
    b"AT+CMGL=4\r\r\n+CMGL: 1,3,,20\r\n0011000B916407281553F80000AA0AE8329BFD4697D9EC37\r\n"
    b"^RSSI:20\r\n+CMGL: 2,0,,25\r\n0011\r\n\r\nOK\r\n"
)


@settings(derandomize=True)  # deterministic: same examples every run
@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    whole = AtParser()
    whole.begin("AT+CMGL=4")
    expected = whole.feed(TRANSCRIPT)
    split = AtParser()
    split.begin("AT+CMGL=4")
    events: list[Event] = []
    last = 0
    for cut in [*sorted(cuts), len(TRANSCRIPT)]:
        events += split.feed(TRANSCRIPT[last:cut])
        last = cut
    assert events == expected
    assert replies(events)[0].lines[0] == "+CMGL: 1,3,,20"


@settings(max_examples=300, derandomize=True)
@given(
    st.lists(st.binary(max_size=64), max_size=20),
    st.lists(st.sampled_from(["AT", "AT+CSQ", "AT+CMGS=20", "AT+CPIN?"]), max_size=5),
)
def test_garbage_never_raises(chunks: list[bytes], commands: list[str]) -> None:
    p = AtParser()
    for i, chunk in enumerate(chunks):
        if commands and not p.busy and i % 3 == 0:
            cmd = commands[i % len(commands)]
            p.begin(cmd, expect_prompt=cmd.startswith("AT+CMGS"))
        for event in p.feed(chunk):
            assert isinstance(event, Urc | Prompt | Reply | Stray)
        if i % 5 == 4:
            p.cancel()
