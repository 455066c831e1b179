"""Reply parsing (replies.py) on real answers, without a modem or a pty."""

from __future__ import annotations

import pytest

from otpd.channels.sms import replies
from otpd.channels.sms.at import Final, FinalKind, parse_final


def final(line: str) -> Final:
    parsed = parse_final(line)
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(
    ("value", "free"),
    [
        ('"SM",3,30,"SM",3,30,"SM",3,30', 27),  # three storages: <mem2> counts
        ('"SM",14,50,"SM",14,50', 36),  # Wavecom: two storages
        ('"SM",3,30', 27),  # one storage only
        ('"ME",5,23,"SM",30,30,"SM",0,30', 0),  # <mem2> full
        ('"SM",40,30,"SM",40,30,"SM",40,30', 0),  # used > total: never negative
        (",,,,,,,,", None),  # Nokia S60: no counters
        ("(),(),()", None),
        ('"SM",0,0,"SM",0,0,"SM",0,0', None),  # total 0 tells nothing
        ('"SM"', None),
    ],
)
def test_cpms_free(value: str, free: int | None) -> None:
    assert replies.cpms_free(value) == free


def test_cmgl_listing_pdu_mode() -> None:
    lines = ("+CMGL: 0,0,,25",
             "07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07",
             "+CMGL: 1, 3,,20", "0011000B916407281553F80000AA0AE8329BFD4697D9EC37")
    assert replies.cmgl_listing(lines) == [
        (0, 0, lines[1]),
        (1, 3, lines[3]),
    ]


def test_cmgl_listing_glued_header_and_missing_body() -> None:
    # A "+CMGL:" glued to the end of the previous PDU; the last header has no PDU line.
    lines = ("+CMGL: 4,2,,20", "0011AABB+CMGL: 5,3,,20", "CCDD", "+cmgl: 6,3,,20")
    assert replies.cmgl_listing(lines) == [(4, 2, "0011AABB"), (5, 3, "CCDD"), (6, 3, "")]


def test_cmgl_listing_ignores_junk() -> None:
    assert replies.cmgl_listing(("+CMGL: x,3", "junk", "")) == []
    assert replies.cmgl_listing(()) == []


@pytest.mark.parametrize(
    ("value", "level"),
    [("18,99", 18), ("0,0", 0), ("31,99", 31), ("99,99", None), ("32,0", None), ("", None),
     ("-1,0", None), ("x,99", None)],
)
def test_csq(value: str, level: int | None) -> None:
    assert replies.csq(value) == level


def test_rssi_urc_is_not_range_checked() -> None:
    assert replies.rssi_urc("17") == 17
    assert replies.rssi_urc("99") == 99
    assert replies.rssi_urc("") is None


@pytest.mark.parametrize(
    ("csq", "dbm", "condition"),
    [(None, None, "unknown"), (99, None, "unknown"), (-1, None, "unknown"), (0, -113, "marginal"),
     (9, -95, "marginal"), (10, -93, "ok"), (14, -85, "ok"), (15, -83, "good"), (19, -75, "good"),
     (20, -73, "excellent"), (31, -51, "excellent")],
)
def test_signal(csq: int | None, dbm: int | None, condition: str) -> None:
    assert replies.csq_to_dbm(csq) == dbm
    assert replies.signal_condition(csq) == condition


@pytest.mark.parametrize(
    ("value", "registered"),
    [("0,1", True), ("2,5", True), ("2,1,4CA,81DE445", True), ("0,2", False), ("0,0", False),
     ("1", True), ("3", False)],
)
def test_creg_answer(value: str, registered: bool) -> None:
    assert replies.creg_registered(value) is registered


@pytest.mark.parametrize(
    ("value", "registered"),
    [("1, E006B, ABE0016", True), ("5", True), ("2", False), ("0,4CA,81DE445", False)],
)
def test_creg_urc(value: str, registered: bool) -> None:
    assert replies.creg_urc_registered(value) is registered


def test_cops_operator() -> None:
    assert replies.cops_operator('0,0,"Telkomsel",2') == "Telkomsel"
    assert replies.cops_operator("0") == ""  # not registered


def test_cmgs_reference() -> None:
    assert replies.cmgs_reference(["17"]) == 17
    assert replies.cmgs_reference(["255,\"13/01/28\""]) == 255
    assert replies.cmgs_reference([]) == -1
    assert replies.cmgs_reference([""]) == -1


def test_cpin_states() -> None:
    assert replies.cpin_state(["SIM PIN"]) == "SIM PIN"
    assert replies.cpin_state(["ready", "READY"]) == "READY"
    assert replies.cpin_state([]) is None
    # Wavecom: "+CPIN: READY" and no OK; the lines of the timed-out exchange.
    assert replies.cpin_in_partial(["AT+CPIN?", "+cpin: ready "]) == "READY"
    assert replies.cpin_in_partial(["+CME ERROR: 14"]) is None


def test_identity() -> None:
    assert replies.imei('+CGSN: "866123456789012"') == "866123456789012"
    assert replies.imei("359000000000001") == "359000000000001"
    lines = ("V ICPR72_08w44.1", "24-11-08", "RM-348")
    assert replies.identity_text(lines, True) == "V ICPR72_08w44.1 24-11-08 RM-348"
    assert replies.identity_text(lines, False) == ""


def test_csca() -> None:
    assert replies.csca('"+6281100000",145') == ("+6281100000", 145)
    assert replies.csca('"0811000"') == ("0811000", None)
    assert replies.csca('"",129') is None
    assert replies.csca('"+",145') is None


def test_final_classes() -> None:
    assert replies.is_not_ready(final("+CME ERROR: 14"))
    assert replies.is_not_ready(final("+CMS ERROR: 314"))
    assert not replies.is_not_ready(final("ERROR"))
    assert replies.is_storage_full(final("+CMS ERROR: 322"))
    assert replies.is_storage_full(final("+CME ERROR: 20"))
    assert not replies.is_storage_full(final("+CME ERROR: 322"))
    assert replies.is_permanent(final("+CMS ERROR: 96"))
    assert not replies.is_permanent(final("+CMS ERROR: 38"))
    assert not replies.is_permanent(final("+CME ERROR: 96"))
    assert replies.is_sim_absent(final("+CME ERROR: 10"))
    assert replies.is_smsc_unknown(final("+CMS ERROR: 330"))
    assert not replies.is_smsc_unknown(Final(FinalKind.OK))


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ('0,"Balance 10",15', ("Balance 10", False)),
        ('1,"Reply 1 for more",15', ("Reply 1 for more", True)),
        ('2,"Initiating Release",15', ("Initiating Release", False)),
        ("0", ("", False)),
        ('0,"004200610074",72', ("Bat", False)),  # UCS-2 hex
        ('2,"0048006100",15', ("0048006100", False)),  # DCS 15: left as sent
        ("0, 49B41C74", ("49B41C74", False)),  # unquoted, no DCS (E160)
        ("garbage", ("garbage", False)),
    ],
)
def test_decode_ussd(value: str, decoded: tuple[str, bool]) -> None:
    assert replies.decode_ussd(value) == decoded


def test_helpers() -> None:
    assert replies.fields(' "SM", 3 ,30') == ["SM", "3", "30"]
    assert replies.to_int(" 42 ") == 42
    assert replies.to_int("-1") is None
    assert replies.to_int("") is None
