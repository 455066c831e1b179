from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest

from otpd.msisdn import InvalidReceiver, canonical_msisdn, canonical_receiver, mask
from otpd.otp import (
    KeyFileError,
    generate_code,
    load_or_create_key,
    new_salt,
    otp_digest,
    otp_matches,
)
from otpd.sealing import Sealer, SealError

KEY = b"k" * 32
PARAMS = ("100000", "1234567890", "987654", "674527846556468254")


def test_codes_are_numeric_of_the_configured_length() -> None:
    for length in (4, 6, 10):
        codes = {generate_code(length) for _ in range(200)}
        assert all(len(c) == length and c.isdigit() for c in codes)
        assert len(codes) > 150  # random, not a counter or a constant


def test_every_bound_field_changes_the_digest() -> None:
    salt = new_salt()
    base = otp_digest(KEY, salt, "ref", "123456", "+628126666666", PARAMS)
    assert otp_matches(KEY, salt, base, "ref", "123456", "+628126666666", PARAMS)
    variants = [
        (KEY, salt, "ref2", "123456", "+628126666666", PARAMS),
        (KEY, salt, "ref", "123457", "+628126666666", PARAMS),
        (KEY, salt, "ref", "123456", "+628126666667", PARAMS),
        (KEY, salt, "ref", "123456", "+628126666666", ("1", *PARAMS[1:])),
        (KEY, new_salt(), "ref", "123456", "+628126666666", PARAMS),
        (b"x" * 32, salt, "ref", "123456", "+628126666666", PARAMS),
    ]
    for v in variants:
        assert otp_digest(*v) != base
    # Field boundaries matter: moving characters between fields changes the hash.
    assert otp_digest(KEY, salt, "ab", "c", "r", PARAMS) != otp_digest(KEY, salt, "a", "bc", "r",
                                                                         PARAMS)


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "otp.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "otp.key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"otp\.key_file"):
        load_or_create_key(path)


def test_sealing_round_trip_and_binding() -> None:
    sealer = Sealer(KEY)
    blob = sealer.seal("Your OTP is 123456", "+628126666666")
    assert b"123456" not in blob
    assert sealer.open(blob, "+628126666666") == "Your OTP is 123456"
    with pytest.raises(SealError):
        sealer.open(blob, "+628126666667")
    with pytest.raises(SealError):
        Sealer(b"z" * 32).open(blob, "+628126666666")


@pytest.mark.parametrize(("raw", "expected"), [
    ("08126666666", "+628126666666"),
    ("+62 812-6666-666", "+628126666666"),
    ("00628126666666", "+628126666666"),
    ("628126666666", "+628126666666"),
])
def test_msisdn_canonical(raw: str, expected: str) -> None:
    assert canonical_msisdn(raw, "62") == expected


@pytest.mark.parametrize("raw", ["", "abc", "+12", "0812abc", "+" + "1" * 16, "٠٨١٢٣٤٥٦٧٨"])
def test_msisdn_invalid(raw: str) -> None:
    with pytest.raises(InvalidReceiver):
        canonical_msisdn(raw, "62")


def test_email_receiver_and_mask() -> None:
    # Compared case-insensitively: the whole address is lower-cased (tests/test_msisdn.py).
    assert canonical_receiver("Someone@Domain.TLD", "62") == "someone@domain.tld"
    with pytest.raises(InvalidReceiver):
        canonical_receiver("a@b", "62")
    assert mask("+628126666123") == "+*********123"
    assert "someone" not in mask("someone@domain.tld")


def test_processes_creating_the_key_at_once_all_read_one_whole_key(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "otp.key"
    with concurrent.futures.ProcessPoolExecutor(max_workers=6) as pool:
        keys = list(pool.map(load_or_create_key, [path] * 24))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert sorted(p.name for p in path.parent.iterdir()) == ["otp.key"]  # no temp left
