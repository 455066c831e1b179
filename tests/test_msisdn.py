"""Email receivers are one RFC 5321 mailbox: the rules, a table of good and bad
addresses, and properties that hold for any string."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otpd.msisdn import (
    InvalidReceiver,
    canonical_email,
    canonical_receiver,
    is_email,
    mask,
    split_mailbox,
)
from otpd.wire.codes import Code
from otpd.wire.protocol import (
    ProtocolError,
    RequestOtp,
    SendEmail,
    SendMessage,
    header_value_problem,
    parse_request,
)

GOOD = [
    ("someone@example.org", "someone@example.org"),
    ("Victim@Example.com", "victim@example.com"),
    ("VICTIM@EXAMPLE.COM", "victim@example.com"),
    ("first.last+tag@sub.example.co.id", "first.last+tag@sub.example.co.id"),
    ("o'neil@example.ie", "o'neil@example.ie"),
    ("a#b$c&d*e/f=g?h^i_j`k{l|m}n~o-p@example.org", "a#b$c&d*e/f=g?h^i_j`k{l|m}n~o-p@example.org"),
    ("user@bücher.example", "user@xn--bcher-kva.example"),
    ("user@BÜCHER.Example", "user@xn--bcher-kva.example"),
    ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
    ("user@b\u3002example", "user@b.example"),  # an ideographic full stop separates labels
    ("x@a-b.c0", "x@a-b.c0"),
    ("  padded@example.org ", "padded@example.org"),
    ("l" * 64 + "@example.org", "l" * 64 + "@example.org"),
    ("a@" + ".".join(["d" * 63] * 3) + ".ab", "a@" + ".".join(["d" * 63] * 3) + ".ab"),
]

BAD = [
    # What a header parser reads as other or more recipients.
    "=?utf-8?q?attacker=40evil.test=2C?=victim@example.com",
    "=?utf-8?b?YXR0YWNrZXJAZXZpbC50ZXN0?=@example.com",
    "postmaster)@example.com",
    "victim(x)@example.com",
    "victim@example.com(comment)",
    '"victim"@example.com',
    '"a b"@example.com',
    "<victim@example.com>",
    "Victim <victim@example.com>",
    "a@example.com,b@evil.test",
    "a@example.com;b@evil.test",
    "group:a@example.com;",
    "a b@example.com",
    "a@exa mple.com",
    # Controls and line breaks.
    "a@example.com\r\nRCPT TO:<b@evil.test>",
    "a\r\n@example.com",
    "a\x00@example.com",
    "a\x7f@example.com",
    "a\u2028b@example.com",
    "a\x85b@example.com",
    "a@exa\tmple.com",
    # Not a dot-atom.
    ".a@example.com",
    "a.@example.com",
    "a..b@example.com",
    "a\\b@example.com",
    "a[b]@example.com",
    "l" * 65 + "@example.org",
    "ünï@example.org",
    "\u212aelvin@example.org",  # KELVIN SIGN lower-cases to an ASCII k
    # Source routes in disguise.
    "victim%example.com@relay.example",
    "evil.test!victim@relay.example",
    "@relay.example:victim@example.com",
    # Not one @.
    "@example.com",
    "victim@",
    "a@b@example.com",
    # Not an LDH domain of two labels or more.
    "a@localhost",
    "a@example.com.",
    "a@.example.com",
    "a@example..com",
    "a@-example.com",
    "a@example-.com",
    "a@exa_mple.com",
    "a@[127.0.0.1]",
    "a@127.0.0.1",
    "a@" + "d" * 64 + ".com",
    "a@" + ".".join(["d" * 63] * 4) + ".com",
    "a@\uff20evil.test",  # nameprep maps a fullwidth @ to "@"
    "a@xn--zz.example",  # not valid punycode
    "a@bücher\u2028.example",
    # Over 254 characters in all.
    "l" * 64 + "@" + ".".join(["d" * 60] * 3) + ".example",
]


@pytest.mark.parametrize(("raw", "canonical"), GOOD)
def test_good_addresses_and_their_canonical_form(raw: str, canonical: str) -> None:
    assert canonical_email(raw) == canonical
    assert canonical_receiver(raw, "62") == canonical
    assert canonical_email(canonical) == canonical  # idempotent
    assert is_email(raw)


@pytest.mark.parametrize("raw", BAD)
def test_bad_addresses_are_refused(raw: str) -> None:
    with pytest.raises(InvalidReceiver):
        canonical_email(raw)
    # Never taken for a phone number either.
    with pytest.raises(InvalidReceiver):
        canonical_receiver(raw, "62")


@pytest.mark.parametrize("raw", ["=?utf-8?q?victim=40example.com?=", "victim＠example.com",
                                 "+62 812 (x)", "0812\r\n3456789x"])
def test_hostile_strings_without_an_at_are_not_phone_numbers(raw: str) -> None:
    assert not is_email(raw)
    with pytest.raises(InvalidReceiver):
        canonical_receiver(raw, "62")


def test_refusals_say_what_is_wrong() -> None:
    cases = {
        "=?utf-8?q?a=40b.c?=x@example.com": "encoded word",
        "postmaster)@example.com": "comments",
        "a,b@example.com": "lists",
        "g:a@example.com": "groups",
        "a@localhost": "two labels",
        "a\r@example.com": "control",
        "a%b@example.com": "source routes",
    }
    for raw, words in cases.items():
        with pytest.raises(InvalidReceiver, match=words):
            canonical_email(raw)


def test_split_mailbox_keeps_the_local_part_as_given() -> None:
    # For a configured sender: the domain is canonical, the local part untouched.
    assert split_mailbox("OTP.Sender@Bücher.Example") == ("OTP.Sender", "xn--bcher-kva.example")


def test_mask_hides_the_local_part() -> None:
    assert mask("someone@example.org") == "s***@example.org"


def test_header_values() -> None:
    assert header_value_problem("Your OTP code — ünïcode ✓") is None
    for bad in ["a\rb", "a\nb", "a\r\nBcc: x@evil.test", "a\tb", "a\x00", "a\x7f", "a\x85",
                "a\u2028b", "a\u2029b", "a\x1bb"]:
        assert header_value_problem(bad), repr(bad)


_LOCAL_CHARS = string.ascii_letters + string.digits + "#$&'*+-/=?^_`{|}~."
_ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)


@given(_ANY_TEXT)
def test_any_string_is_one_plain_mailbox_or_refused(raw: str) -> None:
    try:
        canonical = canonical_email(raw)
    except InvalidReceiver:
        return
    local, _, domain = canonical.partition("@")
    assert canonical.isascii() and canonical == canonical.lower()
    assert canonical.count("@") == 1 and local and domain
    assert not set(canonical) & set(" \t\r\n\"(),:;<>[]\\%!"), canonical
    assert "=?" not in canonical and ".." not in canonical
    assert canonical_email(canonical) == canonical


@given(st.text(alphabet=_LOCAL_CHARS, min_size=1, max_size=64),
       st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z]", fullmatch=True),
                min_size=2, max_size=4))
def test_dot_atoms_on_ldh_domains_are_accepted(local: str, labels: list[str]) -> None:
    address = f"{local}@{'.'.join(labels)}"
    dot_atom = not (local.startswith(".") or local.endswith(".") or ".." in local
                    or "=?" in local)
    if dot_atom:
        assert canonical_email(address) == address.lower()
        assert canonical_email(address.upper()) == address.lower()
    else:
        with pytest.raises(InvalidReceiver):
            canonical_email(address)


@pytest.mark.parametrize("command", ["send-email", "send-mail", "send-message", "request-otp"])
def test_the_parser_refuses_a_subject_that_is_not_one_header_line(command: str) -> None:
    data = {"receiver": "a@example.org", "reference": "r", "message": "Code %s"}
    env = parse_request(json.dumps({"command": command,
                                    "data": {**data, "subject": "  Kode ✓  "}}))
    assert isinstance(env.command, RequestOtp | SendEmail | SendMessage)
    assert env.command.subject == "Kode ✓"
    for subject in ["a\r\nBcc: x@evil.test", "a\u2028b", "a\x85b", "a\x7fb"]:
        with pytest.raises(ProtocolError) as info:
            parse_request(json.dumps({"command": command, "data": {**data, "subject": subject}}))
        assert info.value.code == Code.INVALID_REQUEST
        assert info.value.message.startswith("data.subject: must not contain control")
