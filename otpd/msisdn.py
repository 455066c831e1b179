"""Receiver canonicalisation: phone numbers to E.164, email addresses to one mailbox.

An email receiver is one RFC 5321 mailbox (``local@domain``, dot-atom local
part, LDH domain) and nothing a mail parser could read as more: no encoded
words, comments, quotes, angle brackets, lists, groups, spaces or controls.
Its canonical form is the whole address in lower case, the domain in ASCII
(IDN converted): the block list, duplicate ids, limits and the SMTP envelope
all use that one string.
"""

from __future__ import annotations

import re

from otpd.wire.protocol import control_character

_SEPARATORS = re.compile(r"[\s\-().]")

# RFC 5321 local part as a dot-atom: atext runs joined by single dots.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# Relays may read % and ! in a local part as a source route (Postfix's
# allow_percent_hack, UUCP bang paths): another way to name a blocked mailbox.
_ROUTING = frozenset("%!")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_LOCAL = 64
_MAX_DOMAIN = 253
_MAX_ADDRESS = 254  # RFC 5321 path of 256 octets, minus the angle brackets


class InvalidReceiver(ValueError):
    pass


def is_email(receiver: str) -> bool:
    """Anything with an ``@`` is meant as an email address: it is then a valid
    mailbox or refused, never taken for a phone number."""
    return "@" in receiver


def _international_digits(text: str, country_code: str) -> str:
    text = _SEPARATORS.sub("", text.strip())
    if text.startswith("+"):
        return text[1:]
    if text.startswith("00"):
        return text[2:]
    if text.startswith("0"):
        return country_code + text[1:]
    return text


def canonical_msisdn(number: str, country_code: str) -> str:
    """``08126666666`` -> ``+628126666666`` with country code 62.

    Accepts ``+62...``, ``0062...``, ``62...`` and local ``0...`` forms with
    spaces, dashes, dots or brackets between digits.
    """
    digits = _international_digits(number, country_code)
    if not digits.isdigit() or not digits.isascii():
        raise InvalidReceiver("receiver must be a phone number (digits, optional leading +)")
    if not 7 <= len(digits) <= 15:
        raise InvalidReceiver("receiver must have 7 to 15 digits in international form")
    return "+" + digits


def canonical_prefix(prefix: str, country_code: str) -> str:
    """A routing/limit prefix in E.164 form like canonical numbers (``0812`` -> ``+62812``)."""
    digits = _international_digits(prefix, country_code)
    if not digits.isdigit() or not digits.isascii():
        raise InvalidReceiver(f"prefix {prefix!r} must be digits with an optional leading + or 0")
    return "+" + digits


def _ascii_domain(domain: str) -> str:
    """The domain in lower-case ASCII (IDN to A-labels), or InvalidReceiver."""
    if not domain:
        raise InvalidReceiver("email address has no domain after the @")
    if not domain.isascii():
        try:
            # The stdlib codec (IDNA 2003 nameprep): no dependency for one
            # conversion. Its output is checked as LDH below all the same:
            # nameprep maps some characters (a fullwidth @ becomes "@").
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidReceiver("email domain is not a valid internationalised name") from None
    domain = domain.lower()
    if len(domain) > _MAX_DOMAIN:
        raise InvalidReceiver(f"email domain is longer than {_MAX_DOMAIN} characters")
    labels = domain.split(".")
    if len(labels) < 2:
        raise InvalidReceiver("email domain needs at least two labels (name.tld)")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise InvalidReceiver(
                "email domain labels are letters, digits and inner hyphens, 1 to 63 each")
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise InvalidReceiver("email domain has an invalid xn-- label") from None
    if labels[-1].isdigit():
        raise InvalidReceiver("email domain must not end in a numeric label (no IP addresses)")
    return domain


def split_mailbox(address: str) -> tuple[str, str]:
    """Validate one RFC 5321 mailbox; return (local part as given, ASCII
    lower-case domain). Raises InvalidReceiver saying what is wrong."""
    text = address.strip()
    bad = control_character(text)
    if bad is not None:
        raise InvalidReceiver(f"email address contains a control character {bad!r}")
    if "=?" in text:
        raise InvalidReceiver("email address must not contain an encoded word (=?)")
    for char, what in ((" ", "spaces"), ('"', "quotes"), ("(", "comments"), (")", "comments"),
                       ("<", "angle brackets"), (">", "angle brackets"), (",", "lists"),
                       (";", "lists"), (":", "groups"), ("[", "address literals")):
        if char in text:
            raise InvalidReceiver(f"email address must be one plain mailbox: no {what} ({char})")
    if text.count("@") != 1:
        raise InvalidReceiver("email address must have exactly one @")
    local, _, domain = text.partition("@")
    if not local:
        raise InvalidReceiver("email address has no local part before the @")
    if not local.isascii():
        raise InvalidReceiver("email local part must be ASCII")
    if len(local) > _MAX_LOCAL:
        raise InvalidReceiver(f"email local part is longer than {_MAX_LOCAL} characters")
    if not _DOT_ATOM.fullmatch(local):
        raise InvalidReceiver(
            "email local part must be letters, digits and #$&'*+-/=?^_`{|}~ "
            "with single dots between them")
    if _ROUTING.intersection(local):
        raise InvalidReceiver("email local part must not contain % or ! (source routes)")
    ascii_domain = _ascii_domain(domain)
    if len(local) + 1 + len(ascii_domain) > _MAX_ADDRESS:
        raise InvalidReceiver(f"email address is longer than {_MAX_ADDRESS} characters")
    return local, ascii_domain


def canonical_email(address: str) -> str:
    """The one mailbox ``address`` names, as compared and as sent to.

    The whole address is lower-cased, the local part too: RFC 5321 lets a
    server treat ``Victim`` and ``victim`` as two mailboxes, but no real
    provider does, and keeping the case would let one mailbox slip past the
    block list, duplicate ids and limits by changing its notation.
    """
    local, domain = split_mailbox(address)
    return f"{local.lower()}@{domain}"


def canonical_receiver(receiver: str, country_code: str) -> str:
    if is_email(receiver):
        return canonical_email(receiver)
    return canonical_msisdn(receiver, country_code)


def mask(receiver: str) -> str:
    """For logs: only the last 3 digits of a number, enough to correlate
    with a complaint, not enough to harvest numbers."""
    if is_email(receiver):
        local, _, domain = receiver.rpartition("@")
        return f"{local[:1]}***@{domain}"
    plus = "+" if receiver.startswith("+") else ""
    digits = receiver.removeprefix("+")
    return plus + "*" * max(len(digits) - 3, 0) + digits[-3:]
