"""Broker conventions the daemon, ``otpd broker`` and the publisher library agree on (pure).

How a command travels on each broker beyond the envelope itself: the default
topic, the Redis stream field that carries it, the WebSocket topic URL and
the name of a private reply topic.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_TOPIC = "sms"  # every broker's default topic, queue or channel

# Redis streams: the entry field holding the command (and the answer) bytes.
STREAM_FIELD = "message"

# A client that waits for an answer listens on a topic of its own with this prefix.
REPLY_TOPIC_PREFIX = "otp-reply-"


def reply_topic() -> str:
    """A fresh, unguessable reply topic (sent as the envelope's ``callback_topic``)."""
    return f"{REPLY_TOPIC_PREFIX}{uuid.uuid4()}"


def entry_body(fields: dict[Any, Any] | None) -> bytes | None:
    """The command bytes of a stream entry, or None if it has none.

    An entry with a single field of another name is accepted too (publishers
    that chose their own field name)."""
    if not fields:
        return None
    for key, value in fields.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if name == STREAM_FIELD:
            return value if isinstance(value, bytes) else str(value).encode()
    if len(fields) == 1:
        value = next(iter(fields.values()))
        return value if isinstance(value, bytes) else str(value).encode()
    return None


def topic_url(url: str, topic: str) -> str:
    """``url`` with its ``topic`` query parameter set to ``topic`` (WebSocket broker)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "topic"]
    query.append(("topic", topic))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), ""))
