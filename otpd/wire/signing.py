"""HMAC signatures on broker envelopes and on their replies (pure: no I/O), an
otpd extension.

A broker ACL mistake must not let anyone who can publish to the topic send SMS
from the Pi, so a consumer may require every command to be signed
(``require_signature = true`` with ``signing_key``); and anyone who can
publish on a reply topic must not be able to answer in the daemon's name
(a forged ``"0000"`` to a ``verify-otp`` with a wrong code), so the daemon
signs its replies and binds each one to the command it answers.

Commands, for publishers in any language:

1. Build the envelope as usual (``command``, ``data``, ``callback_topic``...).
2. Add a top-level ``"timestamp"``: the current time as integer unix seconds.
   (Top-level rather than ``data.date_time`` so that the signature covers a
   field otpd controls the meaning of; ``date_time`` stays whatever the app
   puts there.)
3. Add a top-level ``"nonce"``: a fresh random string for every command
   (32 hex digits from a CSPRNG). otpd executes each signature once, so
   without a nonce two identical commands sent in the same second would be
   one command, and the second refused as a replay.
4. ``canonical`` = the JSON of the whole envelope *without* ``"signature"``,
   keys sorted at every level, separators ``,`` and ``:`` with no spaces,
   non-ASCII characters written as themselves (not ``\\uXXXX``), ``/`` not
   escaped, encoded as UTF-8. Python:
   ``json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``;
   PHP: ``json_encode`` of a recursively ``ksort``-ed array with
   ``JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES``. Use integers and
   strings only (no floats: their text differs between languages).
5. ``"signature"`` = lowercase hex of ``HMAC-SHA256(key, canonical)`` where
   ``key`` is the UTF-8 bytes of the shared ``signing_key``.

otpd re-serialises the parsed JSON the same way, compares in constant time,
refuses a timestamp more than ``max_skew`` (300 s) away from its clock, and
remembers every accepted signature (:func:`replay_key`) at least that long:
a captured command published again is refused.

Replies (the daemon signs, the publisher checks):

1. The daemon's answer (``command``, ``response_code``, ``data``...) gets a
   top-level ``"in_reply_to"``: the ``signature`` of the command it answers
   (``""`` when that command was unsigned).
2. ``"signature"`` = lowercase hex of
   ``HMAC-SHA256(key, "otpd-reply\\n" + canonical)``, ``canonical`` made as
   in step 4. The prefix separates the two uses of the key: a command's
   canonical JSON starts with ``{``, so no reply signature is ever a valid
   command signature (a signed ``block-msisdn`` reply has the shape of a
   command and must not be executable).
3. The publisher accepts an answer only if its signature verifies and its
   ``in_reply_to`` equals the signature it sent; anything else on the reply
   topic is ignored and it keeps waiting. Replies carry no timestamp: being
   bound to a fresh, never-repeated command signature is what makes them fresh.

Status events (opt-in ``status_topic``; the daemon signs, subscribers check):
one JSON object per final delivery state (``{"event": "delivery", ...}``),
``"signature"`` = lowercase hex of ``HMAC-SHA256(key, "otpd-event\n" +
canonical)``. A third domain: an event never verifies as a command or as a
reply, and neither of those as an event. Events carry integer times
(``sent_at``...), so a subscriber can drop stale ones itself.

PHP, for a command::

    function ksort_deep(array $a): array {
        ksort($a, SORT_STRING);
        foreach ($a as $k => $v) {
            if (is_array($v) && $v !== array_values($v)) { $a[$k] = ksort_deep($v); }
        }
        return $a;
    }
    $flags = JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES;
    $env['timestamp'] = time();
    $env['nonce'] = bin2hex(random_bytes(16));
    unset($env['signature']);
    $env['signature'] = hash_hmac('sha256', json_encode(ksort_deep($env), $flags), $key);

and for checking its answer (``$sent`` = the signature sent)::

    $given = $reply['signature'] ?? ''; unset($reply['signature']);
    $mac = hash_hmac('sha256', "otpd-reply\\n" . json_encode(ksort_deep($reply), $flags), $key);
    $ok = is_string($given) && hash_equals($mac, strtolower(trim($given)))
        && hash_equals($sent, (string)($reply['in_reply_to'] ?? ''));
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from typing import Any

MAX_SKEW = 300.0
SIGNATURE_FIELD = "signature"
TIMESTAMP_FIELD = "timestamp"
NONCE_FIELD = "nonce"
IN_REPLY_TO_FIELD = "in_reply_to"
# Prepended to a reply's canonical bytes: never the first byte of a command's.
REPLY_DOMAIN = b"otpd-reply\n"
# And to a status event's: neither a command's nor a reply's.
EVENT_DOMAIN = b"otpd-event\n"


class SignatureError(Exception):
    """Why an envelope's signature is refused (never contains the key)."""


def canonical_bytes(envelope: dict[str, Any]) -> bytes:
    """The bytes that are signed: the envelope without ``signature``."""
    body = {k: v for k, v in envelope.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def compute_signature(envelope: dict[str, Any], key: str | bytes) -> str:
    """A command's signature (the reply's is :func:`compute_reply_signature`)."""
    return hmac.new(_key_bytes(key), canonical_bytes(envelope), hashlib.sha256).hexdigest()


def compute_reply_signature(reply: dict[str, Any], key: str | bytes) -> str:
    return hmac.new(_key_bytes(key), REPLY_DOMAIN + canonical_bytes(reply),
                    hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign(envelope: dict[str, Any], key: str | bytes, now: float | None = None) -> dict[str, Any]:
    """A copy of ``envelope`` with ``timestamp`` (now), ``nonce`` (fresh unless
    one is already there) and ``signature`` set."""
    signed = {k: v for k, v in envelope.items() if k != SIGNATURE_FIELD}
    signed[TIMESTAMP_FIELD] = int(time.time() if now is None else now)
    if not signed.get(NONCE_FIELD):
        signed[NONCE_FIELD] = new_nonce()
    signed[SIGNATURE_FIELD] = compute_signature(signed, key)
    return signed


def _normalised(signature: str) -> bytes:
    # ASCII bytes for compare_digest (it refuses non-ASCII str).
    return signature.strip().lower().encode("utf-8", "replace")


def _given_signature(envelope: dict[str, Any]) -> str:
    signature = envelope.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not signature.strip():
        raise SignatureError("signature: missing")
    return signature


def verify(envelope: dict[str, Any], key: str | bytes, now: float | None = None,
           max_skew: float = MAX_SKEW) -> None:
    """Raise :class:`SignatureError` unless the envelope is a command signed with
    ``key`` and its timestamp is within ``max_skew`` seconds of ``now``. (A
    reply's signature never verifies here: it is made over other bytes.)"""
    signature = _given_signature(envelope)
    stamp = envelope.get(TIMESTAMP_FIELD)
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise SignatureError("timestamp: missing or not a number")
    try:
        expected = compute_signature(envelope, key)
    except (TypeError, ValueError):
        raise SignatureError("envelope cannot be canonicalised") from None
    if not hmac.compare_digest(_normalised(signature), expected.encode("ascii")):
        raise SignatureError("signature: does not match")
    clock = time.time() if now is None else now
    if abs(clock - stamp) > max_skew:
        raise SignatureError(f"timestamp: more than {int(max_skew)} s from the gateway's clock")


def replay_key(envelope: dict[str, Any]) -> str:
    """The key under which an accepted signed command is remembered so that it
    is executed once: its signature, normalised (call after :func:`verify`)."""
    return _given_signature(envelope).strip().lower()


def sign_reply(reply: dict[str, Any], request_signature: str,
               key: str | bytes) -> dict[str, Any]:
    """A copy of ``reply`` bound to the command signed ``request_signature``
    (``""``: the command was unsigned) and signed in the reply domain."""
    signed = {k: v for k, v in reply.items() if k != SIGNATURE_FIELD}
    signed[IN_REPLY_TO_FIELD] = request_signature
    signed[SIGNATURE_FIELD] = compute_reply_signature(signed, key)
    return signed


def verify_reply(reply: dict[str, Any], request_signature: str, key: str | bytes) -> None:
    """Raise :class:`SignatureError` unless ``reply`` is signed with ``key`` as
    a reply and answers the command signed ``request_signature``."""
    signature = _given_signature(reply)
    bound = reply.get(IN_REPLY_TO_FIELD)
    if not isinstance(bound, str):
        raise SignatureError("in_reply_to: missing")
    try:
        expected = compute_reply_signature(reply, key)
    except (TypeError, ValueError):
        raise SignatureError("reply cannot be canonicalised") from None
    if not hmac.compare_digest(_normalised(signature), expected.encode("ascii")):
        raise SignatureError("signature: does not match")
    if not hmac.compare_digest(_normalised(bound), _normalised(request_signature)):
        raise SignatureError("in_reply_to: answers another command")


def compute_event_signature(event: dict[str, Any], key: str | bytes) -> str:
    return hmac.new(_key_bytes(key), EVENT_DOMAIN + canonical_bytes(event),
                    hashlib.sha256).hexdigest()


def sign_event(event: dict[str, Any], key: str | bytes) -> dict[str, Any]:
    """A copy of a status event, signed in the event domain."""
    signed = {k: v for k, v in event.items() if k != SIGNATURE_FIELD}
    signed[SIGNATURE_FIELD] = compute_event_signature(signed, key)
    return signed


def verify_event(event: dict[str, Any], key: str | bytes) -> None:
    """Raise :class:`SignatureError` unless ``event`` is a status event signed
    with ``key`` (a command's or a reply's signature never verifies here)."""
    signature = _given_signature(event)
    try:
        expected = compute_event_signature(event, key)
    except (TypeError, ValueError):
        raise SignatureError("event cannot be canonicalised") from None
    if not hmac.compare_digest(_normalised(signature), expected.encode("ascii")):
        raise SignatureError("signature: does not match")
