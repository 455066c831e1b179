"""Which callback topics a broker consumer may answer on (pure: no I/O).

A command names its own reply address (``callback_topic``), so the address
is data from whoever could publish on the command topic and is checked like
any other input before otpd writes anything there. A reply topic:

* is 1..200 characters from ``A-Z a-z 0-9 . _ - : /`` (no wildcards ``+ # *``,
  no ``$`` system topics, no spaces or control characters, no ``..``);
* is not a command topic of any configured broker (a reply there would be
  read back as a command);
* does not start with a reserved prefix: the store's Redis key prefix
  (``otpd:`` by default), so that a reply never creates or changes one of
  otpd's own keys (the block list, an OTP, a rate counter).

OTP-Publisher's own reply topics (``modem-list-<rand6>``, ``ussd-<rand6>``)
and otpd's client's (``otp-reply-<uuid>``) pass. A topic that does not pass
gets no reply; the command itself is refused (and logged), since its sender
either made a mistake or is probing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_REPLY_TOPIC_CHARS = 200
_ALLOWED = re.compile(r"[A-Za-z0-9._:/-]+")


@dataclass(frozen=True)
class ReplyTopicRules:
    """The command topics and reserved key prefixes a reply must stay clear of."""

    command_topics: frozenset[str] = frozenset()
    reserved_prefixes: tuple[str, ...] = ()

    @classmethod
    def build(cls, command_topics: Iterable[str], reserved_prefixes: Iterable[str]
              ) -> ReplyTopicRules:
        return cls(frozenset(command_topics), tuple(p for p in reserved_prefixes if p))

    def refusal(self, topic: str) -> str | None:
        """Why ``topic`` may not be answered on, or None when it may."""
        if not 0 < len(topic) <= MAX_REPLY_TOPIC_CHARS:
            return f"must be 1..{MAX_REPLY_TOPIC_CHARS} characters"
        if _ALLOWED.fullmatch(topic) is None:
            return "may hold only letters, digits and . _ - : /"
        if ".." in topic:
            return "must not contain '..'"
        if topic in self.command_topics:
            return "is a command topic"
        for prefix in self.reserved_prefixes:
            if topic.startswith(prefix):
                return f"is inside otpd's reserved key prefix {prefix!r}"
        return None
