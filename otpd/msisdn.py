"""Receiver canonicalisation: phone numbers to E.164, email addresses to lower-case domain."""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[\s\-().]")
_EMAIL = re.compile(
    r"^[^@\s\"<>,;]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)+$"
)


class InvalidReceiver(ValueError):
    pass


def is_email(receiver: str) -> bool:
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


def canonical_email(address: str) -> str:
    text = address.strip()
    if not _EMAIL.match(text) or len(text) > 254:
        raise InvalidReceiver("receiver is not a valid email address")
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}"


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
