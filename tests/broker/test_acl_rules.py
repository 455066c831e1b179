"""The ACL file of ``otpd broker`` (otpd.broker.acl): parsing, errors, matching."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otpd.broker.acl import Access, Acl, AclError, load

REPO = Path(__file__).resolve().parents[2]

PUB = Access(publish=True)
SUB = Access(subscribe=True)
BOTH = Access(publish=True, subscribe=True)
NONE = Access()


def problems(text: str) -> list[str]:
    with pytest.raises(AclError) as info:
        Acl.parse(text, "broker.acl")
    return info.value.problems


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \t\n  # indented\n"])
def test_empty_file_grants_nothing(text: str) -> None:
    acl = Acl.parse(text)
    assert len(acl) == 0 and acl.users == []
    assert not acl.has_rule("otpd")
    assert acl.access("otpd", "sms") == NONE and not acl.access("otpd", "sms")


def test_one_line_per_user_and_comments() -> None:
    acl = Acl.parse(
        "# daemon and app\n"
        "otpd  sub=sms pub=otp-reply-*,ussd-*   # trailing comment\n"
        "\n"
        "app\tpub=sms\tsub=otp-reply-*\r\n"
    )
    assert acl.users == ["otpd", "app"]
    assert acl.access("otpd", "sms") == SUB
    assert acl.access("otpd", "otp-reply-1") == PUB
    assert acl.access("otpd", "ussd-abc123") == PUB
    assert acl.access("app", "sms") == PUB
    assert acl.access("app", "otp-reply-1") == SUB
    assert acl.access("app", "ussd-abc123") == NONE


def test_unknown_user_has_no_rule() -> None:
    acl = Acl.parse("otpd sub=sms\n")
    assert acl.has_rule("otpd")
    assert not acl.has_rule("mallory")
    assert acl.access("mallory", "sms") == NONE


def test_lines_add_up_and_pubsub_is_both() -> None:
    acl = Acl.parse("app pub=a\napp sub=a,b\nother pubsub=c\n")
    assert acl.access("app", "a") == BOTH
    assert acl.access("app", "b") == SUB
    assert acl.access("other", "c") == BOTH


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("sms", "sms", True),
        ("sms", "SMS", False),  # case counts
        ("sms", "sms2", False),  # whole topic, not a prefix
        ("sms", "xsms", False),
        ("otp-reply-*", "otp-reply-", True),  # * may be empty
        ("otp-reply-*", "otp-reply-0b7c-uuid", True),
        ("otp-reply-*", "otp-reply", False),
        ("*", "anything at all", True),
        ("a*b*c", "a--b--c", True),
        ("a*b*c", "a--c--b", False),
        ("a.c", "abc", False),  # regex characters are literal
        ("a+", "aa", False),
        ("[x]", "[x]", True),
        ("100%%", "100%", True),
        ("*-%u-*", "x-app-y", True),
    ],
)
def test_patterns(pattern: str, topic: str, matches: bool) -> None:
    acl = Acl.parse(f"app sub={pattern}\n")
    assert acl.access("app", topic) == (SUB if matches else NONE)


def test_any_user_and_user_substitution() -> None:
    acl = Acl.parse("* sub=inbox-%u pub=outbox\nadmin pub=inbox-*\n")
    assert acl.has_rule("anyone")
    assert acl.access("alice", "inbox-alice") == SUB
    assert acl.access("alice", "inbox-bob") == NONE
    assert acl.access("alice", "outbox") == PUB
    # The * lines apply on top of a user's own.
    assert acl.access("admin", "inbox-bob") == PUB
    assert acl.access("admin", "inbox-admin") == BOTH


def test_user_name_is_literal_in_a_pattern() -> None:
    """A user called ``a*`` gets its own topic, not every topic starting with a."""
    acl = Acl.parse("* sub=u-%u\n")
    assert acl.access("a*", "u-a*") == SUB
    assert acl.access("a*", "u-abc") == NONE
    assert acl.access("a.b", "u-aXb") == NONE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("otpd\n", "line 1: user 'otpd' has no PERMISSION=TOPICS (pub=, sub= or pubsub=)"),
        ("otpd sms\n", "line 1: 'sms' is not PERMISSION=TOPICS"),
        ("\n\notpd publish=sms\n", "line 3: unknown permission 'publish' "
                                   "(expected pub, sub or pubsub)"),
        ("pub=sms\n", "line 1: expected USER PERMISSION=TOPICS..., but the line starts "
                      "with 'pub=sms'"),
        ("otpd pub=\n", "line 1: empty topic pattern in 'pub='"),
        ("otpd pub=a,,b\n", "line 1: empty topic pattern in 'pub=a,,b'"),
        ("otpd pub=50%\n", "line 1: topic pattern '50%': '%' must be followed by 'u' "
                           "(user) or '%' in 'pub=50%'"),
        ("otpd pub=a\x7fb\n", "line 1: topic pattern 'a\\x7fb' has control characters "
                              "in 'pub=a\\x7fb'"),
        ("otpd Sub=sms\n", "line 1: unknown permission 'Sub' (expected pub, sub or pubsub)"),
    ],
)
def test_bad_lines_are_named(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_every_bad_line_reported_and_nothing_half_loaded() -> None:
    with pytest.raises(AclError) as info:
        Acl.parse("good pub=sms\nbad1\nok sub=x\nbad2 pub=%\n", "/etc/otpd/broker.acl")
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("/etc/otpd/broker.acl: line 2: ")
    assert lines[1].startswith("/etc/otpd/broker.acl: line 4: ")


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "broker.acl"
    path.write_text("otpd sub=sms\n")
    assert load(path).access("otpd", "sms") == SUB
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent")
    path.write_bytes(b"otpd sub=sms\napp pub=\xff\n")
    with pytest.raises(AclError, match=r"broker\.acl: line 2: not valid UTF-8"):
        load(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "broker.acl"
    path.write_text("otpd sub=sms\n")
    path.chmod(0)
    with pytest.raises(AclError, match="cannot read"):
        load(path)


def test_example_file_separates_daemon_and_apps() -> None:
    """etc/broker.acl.example: apps publish commands and read replies, only
    otpd publishes replies (DESIGN §7)."""
    acl = load(REPO / "etc" / "broker.acl.example")
    replies = ["otp-reply-6f1c", "modem-list-a1b2c3", "ussd-a1b2c3"]
    assert acl.access("otpd", "sms") == SUB
    assert acl.access("kamshory", "sms") == PUB
    for topic in replies:
        assert acl.access("otpd", topic) == PUB
        assert acl.access("kamshory", topic) == SUB
    assert not acl.has_rule("someone-else")
    assert acl.users == ["otpd", "kamshory"]
