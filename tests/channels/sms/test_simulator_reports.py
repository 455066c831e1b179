"""The simulator's status reports, driven on the pure device model with a fake clock."""

from __future__ import annotations

import pytest

from otpd.channels.sms import pdu
from otpd.channels.sms.simulator.model import DeviceModel

from .test_simulator_model import ask, device

RECEIVER = "+628121234567"


def send(model: DeviceModel, *, report: bool = True) -> bytes:
    (part,) = pdu.encode_submit(RECEIVER, "code 1234", status_report=report)
    assert ask(model, f"AT+CMGS={part.tpdu_length}\r".encode()).endswith(b"> ")
    return ask(model, part.hex.encode() + b"\x1a")


def setup(model: DeviceModel, cnmi: str) -> None:
    ask(model, b"ATE0\r")
    assert ask(model, f"AT+CNMI={cnmi}\r".encode()) == b"\r\nOK\r\n"


def test_direct_report_after_the_delay() -> None:
    model, clock = device(report_delay=2.0)
    setup(model, "2,1,0,1,0")
    assert send(model) == b"\r\n+CMGS: 1\r\n\r\nOK\r\n"
    assert model.next_timer() == 102.0
    model.run_timers()
    assert model.data_to_send() == b""  # not yet
    clock.now = 102.0
    model.run_timers()
    head, body = model.data_to_send().decode().split("\r\n")[1:3]
    assert head == "+CDS: 25" and model.next_timer() is None
    report = pdu.decode_listed(body, 25)
    assert isinstance(report, pdu.StatusReport)
    assert (report.reference, report.recipient, report.status) == (1, RECEIVER, 0x00)


def test_stored_report_is_announced_and_listed() -> None:
    model, _ = device(report_delay=0.0, reports="failed")
    setup(model, "2,1,0,2")
    send(model)
    model.run_timers()
    assert model.data_to_send() == b'\r\n+CDSI: "SM",1\r\n'
    head, body, final = [ln for ln in ask(model, b"AT+CMGR=1\r").decode().splitlines() if ln]
    assert head.startswith("+CMGR:") and final == "OK"
    report = pdu.decode_listed(body, int(head.rsplit(",", 1)[1]))
    assert isinstance(report, pdu.StatusReport) and report.status == 0x41
    assert report.outcome is pdu.ReportOutcome.FAILED


@pytest.mark.parametrize(("cnmi", "reports", "srr"), [
    ("2,1,0,0,0", "delivered", True),  # ds=0: the modem drops reports
    ("2,1,0,1,0", "never", True),  # the network stays silent
    ("2,1,0,1,0", "delivered", False),  # nobody asked
])
def test_no_report(cnmi: str, reports: str, srr: bool) -> None:
    model, clock = device(reports=reports)
    setup(model, cnmi)
    send(model, report=srr)
    clock.now += 10
    model.run_timers()
    assert model.data_to_send() == b"" and model.storage == {}


def test_refused_cnmi_and_custom_status() -> None:
    model, _ = device(report_ds=(0, 2), report_status=0x62, report_delay=0.0)
    ask(model, b"ATE0\r")
    assert ask(model, b"AT+CNMI=2,1,0,1,0\r") == b"\r\nERROR\r\n"
    setup(model, "2,1,0,2")
    send(model)
    model.run_timers()
    model.data_to_send()
    report = pdu.decode(model.status_reports[0])
    assert isinstance(report, pdu.StatusReport)
    assert report.outcome is pdu.ReportOutcome.GAVE_UP


def test_unknown_reports_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="reports"):
        device(reports="sometimes")
