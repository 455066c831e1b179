"""Topic permissions of ``otpd broker``: the ACL file's parser and matcher.

Pure: the only I/O is :func:`load`, which reads one file.

The file (default ``broker.acl`` next to the htpasswd file) has one rule per
line::

    # USER    PERMISSION=TOPICS ...
    otpd      sub=sms  pub=otp-reply-*,modem-list-*,ussd-*
    kamshory  pub=sms  sub=otp-reply-*,modem-list-*,ussd-*

* ``USER`` is a user name of the htpasswd file, or ``*`` for every user.
* ``PERMISSION`` is ``pub`` (may publish), ``sub`` (may subscribe: receives
  the topic's frames) or ``pubsub`` (both); ``TOPICS`` is a comma-separated
  list of topic patterns. A line holds one or more ``PERMISSION=TOPICS``.
* In a pattern, ``*`` stands for any run of characters (also none), ``%u``
  for the connecting user's name (taken literally) and ``%%`` for ``%``.
  Everything else is matched exactly, case included.
* A user's permissions are everything its own lines and the ``*`` lines
  grant; there is no "deny". A user no line names gets nothing.
* ``#`` at the start of a field starts a comment up to the end of the line;
  blank lines are ignored. Topics holding spaces, commas or a leading ``#``
  cannot be granted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ANY_USER: Final = "*"
_PERMISSIONS: Final = {"pub": (True, False), "sub": (False, True), "pubsub": (True, True)}


class AclError(Exception):
    """An ACL file that cannot be used; every problem names its line."""

    def __init__(self, source: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.source = os.fspath(source)
        self.problems = list(problems)
        super().__init__("\n".join(f"{self.source}: {p}" for p in self.problems))


@dataclass(frozen=True, slots=True)
class Access:
    """What one user may do on one topic."""

    publish: bool = False
    subscribe: bool = False

    def __bool__(self) -> bool:
        return self.publish or self.subscribe

    def __str__(self) -> str:
        names = [n for n, ok in (("pub", self.publish), ("sub", self.subscribe)) if ok]
        return ",".join(names) or "none"


NO_ACCESS: Final = Access()


@dataclass(frozen=True, slots=True)
class Grant:
    """One ``PERMISSION=PATTERN`` of one line."""

    pattern: str
    publish: bool
    subscribe: bool
    line: int

    def matches(self, user: str, topic: str) -> bool:
        return _regex(self.pattern, user).fullmatch(topic) is not None


# A pattern is literal text, "*", "%u" or "%%"; a lone "%" is an error.
_PIECE = re.compile(r"\*|%u|%%|%|[^*%]+")


def _pattern_problem(pattern: str) -> str | None:
    if not pattern:
        return "empty topic pattern"
    if not pattern.isprintable():
        return f"topic pattern {pattern!r} has control characters"
    if "%" in _PIECE.findall(pattern):
        return f"topic pattern {pattern!r}: '%' must be followed by 'u' (user) or '%'"
    return None


def _regex(pattern: str, user: str) -> re.Pattern[str]:
    parts = []
    for piece in _PIECE.findall(pattern):
        if piece == "*":
            parts.append(".*")
        elif piece == "%u":
            parts.append(re.escape(user))
        elif piece == "%%":
            parts.append("%")
        else:
            parts.append(re.escape(piece))
    # re caches compiled patterns, so a handshake costs a dict lookup.
    return re.compile("".join(parts), re.DOTALL)


class Acl:
    """Parsed rules: user name (or ``*``) to its grants."""

    def __init__(self, rules: Mapping[str, Iterable[Grant]] | None = None) -> None:
        self._rules = {user: tuple(grants) for user, grants in (rules or {}).items()}

    @classmethod
    def parse(cls, text: str, source: str | os.PathLike[str] = "<acl>") -> Acl:
        """Parse the file's text; raises AclError listing every bad line."""
        rules: dict[str, list[Grant]] = {}
        problems: list[str] = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            fields = _fields(line)
            if not fields:
                continue
            user, grants = fields[0], fields[1:]
            where = f"line {lineno}"
            if "=" in user:
                problems.append(f"{where}: expected USER PERMISSION=TOPICS..., "
                                f"but the line starts with {user!r}")
                continue
            if not grants:
                problems.append(f"{where}: user {user!r} has no PERMISSION=TOPICS "
                                "(pub=, sub= or pubsub=)")
                continue
            parsed: list[Grant] = []
            for field in grants:
                name, sep, topics = field.partition("=")
                if not sep:
                    problems.append(f"{where}: {field!r} is not PERMISSION=TOPICS")
                elif name not in _PERMISSIONS:
                    problems.append(f"{where}: unknown permission {name!r} "
                                    "(expected pub, sub or pubsub)")
                else:
                    publish, subscribe = _PERMISSIONS[name]
                    for pattern in topics.split(","):
                        if problem := _pattern_problem(pattern):
                            problems.append(f"{where}: {problem} in {field!r}")
                        else:
                            parsed.append(Grant(pattern, publish, subscribe, lineno))
            rules.setdefault(user, []).extend(parsed)
        if problems:
            raise AclError(source, problems)
        return cls(rules)

    @property
    def users(self) -> list[str]:
        """The user names with a rule (``*`` included if present)."""
        return list(self._rules)

    def has_rule(self, user: str) -> bool:
        """True if some line applies to ``user`` (its own or a ``*`` line)."""
        return user in self._rules or ANY_USER in self._rules

    def access(self, user: str, topic: str) -> Access:
        """What ``user`` may do on ``topic``: the union of every matching grant."""
        publish = subscribe = False
        for grant in (*self._rules.get(user, ()), *self._rules.get(ANY_USER, ())):
            adds = (grant.publish and not publish) or (grant.subscribe and not subscribe)
            if adds and grant.matches(user, topic):
                publish |= grant.publish
                subscribe |= grant.subscribe
        return Access(publish, subscribe) if publish or subscribe else NO_ACCESS

    def __len__(self) -> int:
        return sum(len(grants) for grants in self._rules.values())


def _fields(line: str) -> list[str]:
    """Whitespace-separated fields up to a field starting with ``#``."""
    fields = []
    for field in line.split():
        if field.startswith("#"):
            break
        fields.append(field)
    return fields


def load(path: str | os.PathLike[str]) -> Acl:
    """Read and parse ``path``. Raises FileNotFoundError if it does not exist
    (the caller decides what that means) and AclError for anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AclError(p, [f"cannot read: {exc.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AclError(p, [f"line {line}: not valid UTF-8"]) from None
    return Acl.parse(text, p)
