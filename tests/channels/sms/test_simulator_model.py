"""The simulator's device model driven directly: bytes in, bytes out, no pty."""

from __future__ import annotations

import pytest

from otpd.channels.sms import pdu
from otpd.channels.sms.simulator.model import DeviceModel, SentMessage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def device(**kw: object) -> tuple[DeviceModel, Clock]:
    clock = Clock()
    model = DeviceModel(name="m1", clock=clock, wall_clock=lambda: 1_700_000_000.0, seed=1,
                        **kw)  # type: ignore[arg-type]
    model.power_on()
    return model, clock


def ask(model: DeviceModel, data: bytes) -> bytes:
    model.receive(data)
    return model.data_to_send()


def test_echo_then_ok() -> None:
    model, _ = device()
    assert ask(model, b"AT\r") == b"AT\r\r\nOK\r\n"
    assert ask(model, b"ATE0\r") == b"ATE0\r\r\nOK\r\n"
    assert ask(model, b"AT\r") == b"\r\nOK\r\n"
    assert model.commands == ["AT", "ATE0", "AT"]


def test_input_split_across_reads() -> None:
    model, _ = device()
    model.echo = False
    assert ask(model, b"AT+C") == b""
    assert ask(model, b"SQ\r") == b"\r\n+CSQ: 18,99\r\n\r\nOK\r\n"


def test_errors_follow_cmee() -> None:
    model, _ = device()
    model.echo = False
    assert ask(model, b"AT+CMGR=9\r") == b"\r\nERROR\r\n"
    assert ask(model, b"AT+CMEE=1\rAT+CMGR=9\r") == b"\r\nOK\r\n\r\n+CMS ERROR: 321\r\n"
    assert ask(model, b"AT+CREG=x\r") == b"\r\nERROR\r\n"  # malformed argument


def test_sim_busy_window_uses_the_injected_clock() -> None:
    model, clock = device(not_ready=5.0)
    model.echo = False
    ask(model, b"AT+CMEE=1\r")
    assert ask(model, b"AT+CMGF=0\r") == b"\r\n+CME ERROR: 14\r\n"
    clock.now += 5.0
    assert ask(model, b"AT+CMGF=0\r") == b"\r\nOK\r\n"


def test_pin_lock_and_puk() -> None:
    model, _ = device(pin="1234")
    model.echo = False
    ask(model, b"AT+CMEE=1\r")
    assert ask(model, b"AT+CPIN?\r") == b"\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n"
    assert ask(model, b"AT+CMGF=0\r") == b"\r\n+CME ERROR: 11\r\n"
    for _ in range(3):
        assert ask(model, b'AT+CPIN="0000"\r') == b"\r\n+CME ERROR: 16\r\n"
    assert ask(model, b"AT+CPIN?\r") == b"\r\n+CPIN: SIM PUK\r\n\r\nOK\r\n"
    assert model.pin_attempts == 3


def test_send_pdu_records_the_message() -> None:
    model, _ = device()
    model.echo = False
    seen: list[SentMessage] = []
    model.on_sent = seen.append
    part = pdu.encode_submit("+6281234567890", "Kode OTP 123456")[0]
    assert ask(model, f"AT+CMGS={part.tpdu_length}\r".encode()) == b"\r\n> "
    assert ask(model, part.hex.encode() + b"\x1a") == b"\r\n+CMGS: 1\r\n\r\nOK\r\n"
    assert seen == model.sent
    assert [(m.receiver, m.text, m.parts, m.time) for m in seen] == [
        ("+6281234567890", "Kode OTP 123456", 1, 1_700_000_000.0)]


def test_bad_pdu_and_escape() -> None:
    model, _ = device()
    model.echo = False
    ask(model, b"AT+CMEE=1\r")
    assert ask(model, b"AT+CMGS=5\r") == b"\r\n> "
    assert ask(model, b"00FF\x1a") == b"\r\n+CMS ERROR: 304\r\n"
    assert ask(model, b"AT+CMGS=5\r") == b"\r\n> "
    assert ask(model, b"0011\x1b") == b"\r\nOK\r\n"  # ESC aborts: nothing sent
    assert model.sent == []


def test_delay_pauses_until_resume_and_faults_apply_after_it() -> None:
    model, _ = device(delay=0.5)
    model.echo = False
    ask(model, b"AT+CMEE=1\r")
    part = pdu.encode_submit("+6281234567890", "hi")[0]
    ask(model, f"AT+CMGS={part.tpdu_length}\r".encode())
    assert ask(model, part.hex.encode() + b"\x1aAT\r") == b""
    assert model.pause == 0.5
    model.set_fault("error", code=500)  # set while the part is on its way
    model.resume()
    assert model.data_to_send() == b"\r\n+CMS ERROR: 500\r\n\r\nOK\r\n"  # then the queued AT
    assert model.pause is None and model.sent == []


def test_hang_answers_nothing_but_records_commands() -> None:
    model, _ = device()
    model.set_fault("hang")
    assert ask(model, b"AT\r") == b""
    assert model.commands == ["AT"]
    model.clear_fault()
    assert ask(model, b"AT\r") == b"AT\r\r\nOK\r\n"


def test_store_sent_keeps_copies_and_cmgl_lists_them() -> None:
    model, _ = device(store_sent=True, capacity=1)
    model.echo = False
    ask(model, b"AT+CMEE=1\r")
    part = pdu.encode_submit("+6281234567890", "hi")[0]
    ask(model, f"AT+CMGS={part.tpdu_length}\r".encode())
    assert ask(model, part.hex.encode() + b"\x1a") == b"\r\n+CMGS: 1\r\n\r\nOK\r\n"
    listing = ask(model, b"AT+CMGL=3\r")
    assert listing == f"\r\n+CMGL: 1,3,,{part.tpdu_length}\r\n\r\n{part.hex}\r\n\r\nOK\r\n".encode()
    ask(model, f"AT+CMGS={part.tpdu_length}\r".encode())
    assert ask(model, part.hex.encode() + b"\x1a") == b"\r\n+CMS ERROR: 322\r\n"  # full
    assert ask(model, b"AT+CMGD=1\r") == b"\r\nOK\r\n" and model.storage == {}


def test_incoming_is_announced_and_never_listed_as_sent() -> None:
    model, _ = device()
    index = model.inject_incoming("+628111", "halo")
    assert model.data_to_send() == f'\r\n+CMTI: "SM",{index}\r\n'.encode()
    model.echo = False
    assert ask(model, b"AT+CMGL=3\r") == b"\r\nOK\r\n"
    assert model.storage[index].stat == 0


def test_disconnect_drops_half_typed_input() -> None:
    model, _ = device()
    model.echo = False
    ask(model, b"AT+CMGS=20\r")
    ask(model, b"0011")
    model.disconnect()
    assert ask(model, b"AT\r") == b"\r\nOK\r\n"  # a command again, not PDU text


def test_reboot_locks_the_sim_again() -> None:
    model, _ = device(pin="1234")
    model.echo = False
    ask(model, b'AT+CPIN="1234"\r')
    model.reboot()
    assert model.echo is True
    assert ask(model, b"AT+CPIN?\r") == b"AT+CPIN?\r\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n"


def test_ussd_answer_comes_after_the_ok() -> None:
    model, _ = device()
    model.echo = False
    assert ask(model, b'AT+CUSD=1,"*888#",15\r') == b"\r\nOK\r\n"
    assert model.pause == 0.01
    model.resume()
    assert model.data_to_send().startswith(b'\r\n+CUSD: 0,"Balance: 10000.')


def test_periodic_urcs_and_curc() -> None:
    model, _ = device(profile="huawei")
    assert model.periodic_urc(0) and model.data_to_send() == b"\r\n^RSSI:18\r\n"
    model.curc = False
    assert not model.periodic_urc(1) and model.data_to_send() == b""


def test_wavecom_cpin_without_ok() -> None:
    model, _ = device(profile="wavecom")
    model.echo = False
    assert ask(model, b"AT+CPIN?\r") == b"\r\n+CPIN: READY\r\n"


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        device(profile="nokia3310")
    model, _ = device()
    with pytest.raises(ValueError, match="unknown fault"):
        model.set_fault("melt")
