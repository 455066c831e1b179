"""Logging to stderr; under systemd the journal reads the <N> priority prefixes."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from otpd.settings_reader import Section


@dataclass(frozen=True)
class LogSettings:
    level: str


def parse_log_settings(s: Section) -> LogSettings:
    out = LogSettings(
        level=s.str("level", "info", choices=("debug", "info", "warning", "error")),
    )
    s.finish()
    return out

_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalPrefixFormatter(logging.Formatter):
    """``<3>message``: journald maps the prefix to the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def under_journal() -> bool:
    """True when stderr is connected to the journal ($JOURNAL_STREAM matches it)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journal():
        handler.setFormatter(JournalPrefixFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at debug level could include message payloads.
    for noisy in ("aiosmtplib", "aio_pika", "aiormq", "websockets", "mail.log", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
