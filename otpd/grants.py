"""Who may run which command, and which USSD codes (pure: no I/O).

A *grant* is a command name (``send-mail`` is granted by ``send-email``) or
``modem-identity``, which lets ``get-modem-list`` show what identifies a SIM or
handset (IMSI, IMEI, ICCID, the SIM's number, the serial port's by-id name,
which carries the USB serial number), or ``status-page``, which lets a REST
user view ``/status`` (blocking and unblocking there still needs
``block-msisdn`` and ``unblock-msisdn``). Every REST user and broker consumer
holds :data:`DEFAULT_GRANTS` (the OTP, send and block commands, and echo);
a configured list changes them: a name adds that grant, ``-name`` takes a
default one away (``["request-ussd", "-send-sms"]``).

USSD codes pass an allow-list (:class:`UssdAllowList`). Without configured
patterns the built-in rule admits balance and information codes such as
``*123#``, ``*888#``, ``*100*1#``: a single ``*``, groups of one to four digits
separated by ``*``, a final ``#``, and a first group that 3GPP TS 22.030 does
not reserve for a supplementary service. Configured patterns are written like
the codes they admit, with ``X`` for any one digit (``*100*X#``). Whatever the
patterns say, codes that change call forwarding, barring, call waiting or the
SS password, codes of another shape (``**21*...#``, ``*#...#``, ``#...#``,
``##...#``) and codes with ``+`` are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REQUEST_USSD = "request-ussd"
GET_MODEM_LIST = "get-modem-list"
MODEM_IDENTITY = "modem-identity"
STATUS_PAGE = "status-page"  # view /status (REST users; never a default)

# One grant per command (as the wire protocol names them), then the extra ones.
COMMAND_GRANTS: tuple[str, ...] = (
    "request-otp", "verify-otp", "send-sms", "send-email", "send-message",
    "block-msisdn", "unblock-msisdn", "echo",
    # Between nodes of one shared queue; the seal (the nodes' key) is what
    # authenticates it, so it is granted by default.
    "handover",
    GET_MODEM_LIST, REQUEST_USSD,
)
GRANT_NAMES: tuple[str, ...] = (*COMMAND_GRANTS, MODEM_IDENTITY, STATUS_PAGE)
OPERATIONAL_GRANTS = frozenset({GET_MODEM_LIST, REQUEST_USSD, MODEM_IDENTITY, STATUS_PAGE})
DEFAULT_GRANTS = frozenset(GRANT_NAMES) - OPERATIONAL_GRANTS
ALL_GRANTS = frozenset(GRANT_NAMES)
_ALIASES = {"send-mail": "send-email"}

# What get-modem-list shows only with modem-identity: each identifies the SIM,
# the subscriber or the handset (a by-id port name embeds the USB serial; "sim"
# is the SIM's IMSI as the pool labels its delivery statistics).
IDENTITY_KEYS = frozenset({"imsi", "imei", "iccid", "msisdn", "port", "serial", "sim"})

# Service codes of 3GPP TS 22.030 Annex B. These change where calls and SMS go
# or what the SIM may do: refused even when a configured pattern names them.
_NEVER_CODES = frozenset({
    "21", "67", "61", "62", "002", "004",  # call forwarding
    "33", "331", "332", "35", "351", "330", "333", "353",  # call barring
    "03",  # SS password registration
    "43",  # call waiting
    "31",  # CLIR
    "96", "66", "214",  # explicit call transfer, call deflection, follow me
})
# The other supplementary services: refused by the built-in rule, admitted when
# an operator lists them (some networks use e.g. *363# as their menu).
_RESERVED_CODES = _NEVER_CODES | frozenset({
    "30", "76", "77", "300",  # line identification, CNAP
    "37", "88",  # CCBS, multicall
    "75", "750", "751", "752", "753", "754",  # eMLPP
    "591", "592", "593", "594",  # multiple subscriber profile
    "360", "361", "362", "363",  # user-to-user signalling
})

_CODE_SHAPE = re.compile(r"\*([0-9]+)(?:\*[0-9]+)*#")
_PATTERN_SHAPE = re.compile(r"\*([0-9]+)(?:\*[0-9X]+)*#")
_DEFAULT_SHAPE = re.compile(r"\*[0-9]{1,4}(?:\*[0-9]{1,4}){0,3}#")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a TOML key that needs no quotes
MAX_USSD_CHARS = 40  # what the modem layer accepts
MAX_WILDCARD_GROUP = 6  # longer runs of X could carry a phone number


class GrantError(ValueError):
    """A grant list or USSD pattern that cannot be used; the text says why."""


def grant_for(command: str) -> str:
    """The grant a command needs (``send-mail`` -> ``send-email``)."""
    return _ALIASES.get(command, command)


def rest_grant_key(user: str) -> str:
    """The configuration key of a REST user's grants (quoted when TOML needs it)."""
    return f"server.grants.{user}" if _BARE_KEY.fullmatch(user) else f'server.grants."{user}"'


def parse_grant_list(entries: Sequence[str]) -> frozenset[str]:
    """The defaults changed by ``entries``: ``name`` adds, ``-name`` removes."""
    added: set[str] = set()
    removed: set[str] = set()
    for i, entry in enumerate(entries):
        text = entry.strip()
        remove = text.startswith("-")
        name = grant_for(text[1:].strip() if remove else text)
        if name not in ALL_GRANTS:
            raise GrantError(f"[{i}] {entry!r} is not a grant (known: {', '.join(GRANT_NAMES)};"
                             " -name takes a default one away)")
        (removed if remove else added).add(name)
    both = added & removed
    if both:
        raise GrantError(f"{', '.join(sorted(both))} both granted and taken away")
    names = (DEFAULT_GRANTS | added) - removed
    if MODEM_IDENTITY in names and GET_MODEM_LIST not in names:
        raise GrantError(f"{MODEM_IDENTITY} only shows in {GET_MODEM_LIST}: grant that too")
    return frozenset(names)


@dataclass(frozen=True)
class UssdAllowList:
    """``patterns`` None: the built-in balance/information rule; () admits nothing."""

    patterns: tuple[str, ...] | None = None

    def refusal(self, code: str) -> str | None:
        """Why ``code`` may not be run, or None when it may."""
        shape = _CODE_SHAPE.fullmatch(code)
        if shape is None or len(code) > MAX_USSD_CHARS:
            return ("only codes of the form *digits(*digits)...# are allowed (no supplementary"
                    " service codes such as **21*...#, *#...#, #...#, and no +)")
        service = shape.group(1)
        if service in _NEVER_CODES:
            return f"*{service}... is a supplementary service code (call forwarding, barring...)"
        if self.patterns is None:
            if service in _RESERVED_CODES:
                return f"*{service}... is a supplementary service code"
            if _DEFAULT_SHAPE.fullmatch(code) is None:
                return ("the built-in rule allows groups of 1 to 4 digits, at most 4 groups"
                        " (longer numbers may be phone numbers)")
            return None
        if any(_pattern_regex(p).fullmatch(code) for p in self.patterns):
            return None
        return "not in the USSD allow-list"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("".join("[0-9]" if c == "X" else re.escape(c) for c in pattern))


def parse_ussd_allow(patterns: Sequence[str]) -> UssdAllowList:
    """Check configured patterns (``*123#``, ``*100*X#``); GrantError names the bad one."""
    checked: list[str] = []
    for i, raw in enumerate(patterns):
        pattern = raw.strip().replace("x", "X")
        shape = _PATTERN_SHAPE.fullmatch(pattern)
        where = f"[{i}] {raw!r}"
        if shape is None or len(pattern) > MAX_USSD_CHARS:
            raise GrantError(f"{where}: must look like *123# or *100*X# (a single *, the"
                             " service code in digits, then groups of digits or X (one digit)"
                             f" each after a *, a final #; at most {MAX_USSD_CHARS} characters)")
        if shape.group(1) in _NEVER_CODES:
            raise GrantError(f"{where}: *{shape.group(1)} is a call forwarding, barring or"
                             " other supplementary service code and is never allowed")
        if any(len(run) > MAX_WILDCARD_GROUP for run in re.findall(r"X+", pattern)):
            raise GrantError(f"{where}: at most {MAX_WILDCARD_GROUP} X in a row (a longer"
                             " wildcard could carry a phone number)")
        checked.append(pattern)
    return UssdAllowList(tuple(checked))


@dataclass(frozen=True)
class Grants:
    """What one REST user or broker consumer may do.

    ``setting`` is the configuration key that changes these grants, named in
    refusals ("" = let the caller derive it)."""

    names: frozenset[str] = DEFAULT_GRANTS
    ussd: UssdAllowList = UssdAllowList()
    setting: str = ""

    @classmethod
    def full(cls, setting: str = "") -> Grants:
        """Every grant: the operator (control socket, ``otpd modem``)."""
        return cls(ALL_GRANTS, setting=setting)

    def allows(self, grant: str) -> bool:
        return grant_for(grant) in self.names


def without_identity(value: Any) -> Any:
    """``value`` (JSON-like) without any :data:`IDENTITY_KEYS`, at any depth."""
    if isinstance(value, Mapping):
        return {k: without_identity(v) for k, v in value.items() if k not in IDENTITY_KEYS}
    if isinstance(value, list | tuple):
        return [without_identity(v) for v in value]
    return value
