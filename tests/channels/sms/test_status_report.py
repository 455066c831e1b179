"""SMS-STATUS-REPORT decoding (3GPP TS 23.040 §9.2.2.3, TP-ST §9.2.3.15), byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpd.channels.sms import pdu
from otpd.channels.sms.pdu import ReportOutcome, StatusReport


def test_report_from_a_real_modem() -> None:
    # Source: http://amro.blogspot.com/2007/09/receiving-sms-status-report-message.html
    # ("Receiving SMS status report message"): a modem's +CDS after AT+CNMI=,,,1,
    # TPDU only (no SMSC field), with the author's octet-by-octet breakdown.
    report = pdu.decode("06000B910221815716F2709021510121807090215101718000", with_smsc=False)
    plus2 = timezone(timedelta(hours=2))  # TZ octet 0x80: "08" quarters
    assert report == StatusReport(
        reference=0, recipient="+20121875612",
        submitted=datetime(2007, 9, 12, 15, 10, 12, tzinfo=plus2),
        discharged=datetime(2007, 9, 12, 15, 10, 17, tzinfo=plus2),
        status=0x00)
    assert report.outcome is ReportOutcome.DELIVERED and report.meaning == "received by the SME"
    # The same with the <length> a +CDS line announces (25 TPDU octets): no SMSC.
    assert pdu.decode_listed("06000B910221815716F2709021510121807090215101718000", 25) == report


def test_a_documented_example_without_its_mr_is_refused() -> None:
    # Source: Nordic nRF91 AT command reference, "+CDS" (PDU mode) example:
    # "+CDS: 25" then 24 octets: fo 06 directly followed by the address, TP-MR
    # missing. Read either way it is not a valid report: refused, never misread.
    with pytest.raises(pdu.PduError):
        pdu.decode_listed("060C91534810325476171160316255001711603152120000", 25)


# Built by hand, field by field (23.040 §9.2.2.3), with an SMSC field as 27.005 puts it.
SMSC = bytes.fromhex("06" "91" "2618010000")  # 6 octets: TON intl, +6281100000
FO = bytes([0x06])  # TP-MTI 10 (status report), TP-MMS 1, TP-SRQ 0
MR = bytes([0x2A])  # 42
RA_NATIONAL = bytes.fromhex("0B" "81" "80212143 65F7")  # 11 digits 08121234567, TON unknown
SCTS_MINUS5 = bytes.fromhex("42305041709" "00A")  # 24-03-05 14:07:09, -20 quarters (bit 3)
DT_MINUS5 = bytes.fromhex("42305041701" "10A")  # 24-03-05 14:07:11
HAND_BUILT = SMSC + FO + MR + RA_NATIONAL + SCTS_MINUS5 + DT_MINUS5 + bytes([0x41])


def test_hand_built_report_with_smsc_national_recipient_and_negative_zone() -> None:
    assert HAND_BUILT.hex().upper() == (
        "06912618010000" "06" "2A" "0B818021214365F7" "4230504170900A" "4230504170110A" "41")
    report = pdu.decode(HAND_BUILT.hex())
    minus5 = timezone(-timedelta(hours=5))
    assert report == StatusReport(42, "08121234567",
                                  datetime(2024, 3, 5, 14, 7, 9, tzinfo=minus5),
                                  datetime(2024, 3, 5, 14, 7, 11, tzinfo=minus5), 0x41)
    assert report.outcome is ReportOutcome.FAILED and report.outcome.final
    assert report.meaning == "incompatible destination"
    tpdu_len = len(HAND_BUILT) - len(SMSC)
    assert pdu.decode_listed(HAND_BUILT.hex(), tpdu_len) == report  # +CDS: 26
    # A modem whose <length> counted the SMSC octets too is still understood.
    assert pdu.decode_listed(HAND_BUILT.hex(), len(HAND_BUILT)) == report


def test_optional_parameters_after_tp_st_are_ignored() -> None:
    # TP-PI 0x07 (PID, DCS, UDL present), PID 00, DCS 00, UDL 0: a report on a
    # concatenated part may carry them; they say nothing about delivery.
    tpdu = FO + bytes([0x07]) + bytes.fromhex("0B916821214365F7") + SCTS_MINUS5 + DT_MINUS5
    tpdu += bytes([0x00, 0x07, 0x00, 0x00, 0x00])
    report = pdu.decode(tpdu.hex(), with_smsc=False)
    assert isinstance(report, StatusReport)
    assert (report.reference, report.recipient, report.status) == (7, "+86121234567", 0x00)


def test_status_report_qualifier_and_truncation() -> None:
    command = bytes([0x26]) + HAND_BUILT[len(SMSC) + 1:]  # TP-SRQ: reports on a command
    report = pdu.decode(command.hex(), with_smsc=False)
    assert isinstance(report, StatusReport) and report.command
    for cut in (1, 2, 5, 12, 19, 24):  # the TPDU has 25 octets
        with pytest.raises(pdu.PduError):
            pdu.decode(HAND_BUILT[: len(SMSC) + cut].hex())


@pytest.mark.parametrize(("status", "outcome", "meaning"), [
    (0x00, ReportOutcome.DELIVERED, "received by the SME"),
    (0x01, ReportOutcome.DELIVERED, "forwarded to the SME, delivery not confirmed"),
    (0x02, ReportOutcome.DELIVERED, "replaced by the SC"),
    (0x03, ReportOutcome.DELIVERED, "reserved"),
    (0x10, ReportOutcome.DELIVERED, "SC-specific"),
    (0x20, ReportOutcome.TRYING, "congestion (still trying)"),
    (0x25, ReportOutcome.TRYING, "error in SME (still trying)"),
    (0x26, ReportOutcome.TRYING, "reserved"),
    (0x30, ReportOutcome.TRYING, "SC-specific"),
    (0x40, ReportOutcome.FAILED, "remote procedure error"),
    (0x46, ReportOutcome.FAILED, "SM validity period expired"),
    (0x49, ReportOutcome.FAILED, "SM does not exist"),
    (0x4A, ReportOutcome.FAILED, "reserved"),
    (0x5F, ReportOutcome.FAILED, "SC-specific"),
    (0x60, ReportOutcome.GAVE_UP, "congestion (no more attempts)"),
    (0x65, ReportOutcome.GAVE_UP, "error in SME (no more attempts)"),
    (0x66, ReportOutcome.GAVE_UP, "reserved"),
    (0x7F, ReportOutcome.GAVE_UP, "SC-specific"),
    (0x80, ReportOutcome.GAVE_UP, "reserved"),
    (0xFF, ReportOutcome.GAVE_UP, "reserved"),
])
def test_tp_st_classes(status: int, outcome: ReportOutcome, meaning: str) -> None:
    assert pdu.status_outcome(status) is outcome
    assert pdu.status_meaning(status) == meaning
    assert outcome.final is (outcome is not ReportOutcome.TRYING)


def test_tp_st_is_one_octet() -> None:
    with pytest.raises(ValueError):
        pdu.status_outcome(256)


def test_encoder_matches_the_hand_built_fields() -> None:
    minus5 = timezone(-timedelta(hours=5))
    hex_pdu = pdu.encode_status_report(
        42, "+86121234567", datetime(2024, 3, 5, 14, 7, 9, tzinfo=minus5),
        datetime(2024, 3, 5, 14, 7, 11, tzinfo=minus5), 0x41)
    assert hex_pdu == "00" + (FO + MR + bytes.fromhex("0B916821214365F7") + SCTS_MINUS5
                              + DT_MINUS5 + bytes([0x41])).hex().upper()


@given(
    reference=st.integers(0, 255),
    number=st.from_regex(r"\+?[0-9]{3,15}", fullmatch=True),
    submitted=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2068, 12, 31),
                           timezones=st.just(UTC)),
    delay=st.integers(0, 86400),
    status=st.integers(0, 255),
    smsc=st.booleans(),
)
def test_round_trip(reference: int, number: str, submitted: datetime, delay: int, status: int,
                    smsc: bool) -> None:
    # Two-digit years: %y reads 69..99 as 19xx, so the dates stay before 2069.
    submitted = submitted.replace(microsecond=0)
    discharged = submitted + timedelta(seconds=delay)
    hex_pdu = pdu.encode_status_report(reference, number, submitted, discharged, status,
                                       smsc=smsc)
    tpdu_len = len(hex_pdu) // 2 - (1 if smsc else 0)
    report = pdu.decode_listed(hex_pdu, tpdu_len)
    assert report == StatusReport(reference, number, submitted, discharged, status)
