"""The JSON wire protocol shared by REST and every broker (pure: no I/O).

``parse_request`` turns bytes into an :class:`Envelope` holding a typed
command, or raises :class:`ProtocolError` naming the bad field.
``Response.to_json`` produces what OTP-Publisher and OTP-Pi clients read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from otpd.wire.codes import Code

MAX_MESSAGE_CHARS = 4096
MAX_SUBJECT_CHARS = 998
MAX_REFERENCE_CHARS = 256
MAX_RECEIVER_CHARS = 254
MAX_PARAM_CHARS = 1024
MAX_ID_CHARS = 128
MAX_CALLBACK_DELAY_MS = 10_000
MAX_TOPIC_CHARS = 512

# C0 controls (tab, CR and LF among them), DEL, C1 controls (NEL among them) and
# the Unicode line and paragraph separators: whatever a header writer or
# str.splitlines() may break a line at. A header value holding one is refused
# when the request arrives, not left to fail at every delivery attempt.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ProtocolError(Exception):
    """A request that cannot be executed; ``message`` names the field."""

    def __init__(self, code: Code, message: str, command: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.command = command


Params = tuple[str, str, str, str]


@dataclass(frozen=True)
class RequestOtp:
    receiver: str
    reference: str
    message: str  # template with exactly one %s
    params: Params
    expiration: int | None = None
    subject: str | None = None
    id: str | None = None
    date_time: int | None = None
    name = "request-otp"


@dataclass(frozen=True)
class VerifyOtp:
    receiver: str
    reference: str
    otp: str
    params: Params
    date_time: int | None = None
    name = "verify-otp"


@dataclass(frozen=True)
class SendSms:
    receiver: str
    message: str
    id: str | None = None
    expiration: int | None = None
    date_time: int | None = None
    name = "send-sms"


@dataclass(frozen=True)
class SendEmail:
    receiver: str
    message: str
    subject: str | None = None
    id: str | None = None
    expiration: int | None = None
    date_time: int | None = None
    name = "send-email"


@dataclass(frozen=True)
class SendMessage:
    """SMS or email, chosen by the receiver (``@`` means email)."""

    receiver: str
    message: str
    subject: str | None = None
    id: str | None = None
    expiration: int | None = None
    date_time: int | None = None
    name = "send-message"


@dataclass(frozen=True)
class BlockMsisdn:
    receiver: str
    date_time: int | None = None
    name = "block-msisdn"


@dataclass(frozen=True)
class UnblockMsisdn:
    receiver: str
    date_time: int | None = None
    name = "unblock-msisdn"


@dataclass(frozen=True)
class GetModemList:
    date_time: int | None = None
    name = "get-modem-list"


@dataclass(frozen=True)
class RequestUssd:
    modem_id: str
    ussd_code: str
    date_time: int | None = None
    name = "request-ussd"


@dataclass(frozen=True)
class Echo:
    data: dict[str, Any]
    name = "echo"


@dataclass(frozen=True)
class Handover:
    """A message another node stored but could not send in time, handed back to
    the shared queue (an otpd extension between nodes; see otpd.delivery.handover).
    ``sealed`` is its text, sealed with the nodes' shared key."""

    id: str
    channel: str  # "sms" | "email"
    receiver: str
    subject: str
    expiration: int
    sealed: str
    date_time: int | None = None
    name = "handover"


Command = (
    RequestOtp
    | VerifyOtp
    | SendSms
    | SendEmail
    | SendMessage
    | BlockMsisdn
    | UnblockMsisdn
    | GetModemList
    | RequestUssd
    | Echo
    | Handover
)

@dataclass(frozen=True)
class Envelope:
    command: Command
    name: str  # the command as the client spelled it (send-mail stays send-mail)
    callback_topic: str | None = None
    callback_delay_ms: int = 0
    # The raw JSON object, for transports that need other fields (signatures).
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Response:
    command: str
    code: Code
    data: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    # Not stored (the store failed): a broker should redeliver, not acknowledge.
    transient: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "command": self.command,
            "response_code": self.code.value,
            "data": self.data,
        }
        if self.message:
            body["message"] = self.message
        return body

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()


def control_character(text: str) -> str | None:
    """The first control or line-breaking character in ``text`` (None: clean)."""
    match = _CONTROL.search(text)
    return match.group() if match else None


def _is_unicode(text: str) -> bool:
    """False for a lone surrogate (JSON can escape one): no store, sealer or
    mail writer can encode it, so it is refused here rather than fail there."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_value_problem(text: str) -> str | None:
    """Why ``text`` cannot be a mail header value (None: it can)."""
    bad = control_character(text)
    if bad is None:
        return None
    return f"must not contain control or line-break characters (found {bad!r})"


# -- template ------------------------------------------------------------


def check_template(template: str) -> None:
    """Exactly one ``%s``; ``%%`` is a literal percent; any other ``%`` is refused."""
    count = 0
    i = 0
    while i < len(template):
        if template[i] == "%":
            nxt = template[i + 1 : i + 2]
            if nxt == "s":
                count += 1
            elif nxt != "%":
                raise ProtocolError(
                    Code.INVALID_REQUEST,
                    "data.message: only %s (once) and %% may follow a % sign",
                )
            i += 2
        else:
            i += 1
    if count != 1:
        raise ProtocolError(
            Code.INVALID_REQUEST, "data.message: must contain exactly one %s for the code"
        )


def render_template(template: str, code: str) -> str:
    """Insert ``code`` at ``%s`` (template already checked)."""
    return "%".join(part.replace("%s", code) for part in template.split("%%"))


# -- parsing ---------------------------------------------------------------


def parse_request(raw: bytes | str) -> Envelope:
    """Bytes from any transport to a typed command; raises ProtocolError."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(Code.INVALID_REQUEST, "request is not valid UTF-8") from None
    if not raw.strip():
        raise ProtocolError(Code.INVALID_REQUEST, "request body is empty")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(Code.INVALID_REQUEST, f"request is not valid JSON: {exc}") from None
    return parse_object(obj)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_object(obj: Any) -> Envelope:
    if not isinstance(obj, dict):
        raise ProtocolError(Code.INVALID_REQUEST, "request must be a JSON object")
    name = obj.get("command")
    if not isinstance(name, str) or not name.strip():
        raise ProtocolError(Code.INVALID_REQUEST, "command: is required (a string)")
    name = name.strip()
    parser = _PARSERS.get(name)
    if parser is None:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"command: unknown command {name[:64]!r}", name)
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(Code.INVALID_REQUEST, "data: must be a JSON object", name)
    topic = obj.get("callback_topic")
    bad_topic = not isinstance(topic, str) or len(topic) > MAX_TOPIC_CHARS
    if topic is not None and topic != "" and bad_topic:
        raise ProtocolError(Code.INVALID_REQUEST, "callback_topic: must be a string", name)
    try:
        delay = _int(obj, "callback_delay", "callback_delay")
        command = parser(_Fields(data))
    except ProtocolError as exc:
        exc.command = name
        raise
    delay_ms = 0 if delay is None else min(max(delay, 0), MAX_CALLBACK_DELAY_MS)
    return Envelope(command, name, topic or None, delay_ms, obj)


class _Fields:
    """Typed access to ``data`` with OTP-Publisher's loose types accepted."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def text(self, key: str, *, required: bool = True, limit: int = MAX_MESSAGE_CHARS,
             alias: str | None = None, numbers: bool = False, strip: bool = True) -> str | None:
        value = self.data.get(key)
        if (value is None or value == "") and alias is not None:
            value = self.data.get(alias)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise ProtocolError(Code.INVALID_REQUEST, f"data.{key}: is required")
            return None if value is None else ""
        if numbers and isinstance(value, int | float) and not isinstance(value, bool):
            value = _number_text(value, key)
        if not isinstance(value, str):
            raise ProtocolError(Code.INVALID_REQUEST, f"data.{key}: must be a string")
        if strip:
            value = value.strip()
        if len(value) > limit:
            raise ProtocolError(Code.INVALID_REQUEST, f"data.{key}: longer than {limit} characters")
        if "\x00" in value:
            raise ProtocolError(Code.INVALID_REQUEST, f"data.{key}: contains a NUL character")
        if not _is_unicode(value):
            raise ProtocolError(Code.INVALID_REQUEST,
                                f"data.{key}: contains a lone surrogate (\\ud800-\\udfff)")
        return value

    def subject(self) -> str | None:
        """A mail subject: one header line, so no CR, LF or other controls."""
        value = self.text("subject", required=False, limit=MAX_SUBJECT_CHARS)
        if value:
            problem = header_value_problem(value)
            if problem is not None:
                raise ProtocolError(Code.INVALID_REQUEST, f"data.subject: {problem}")
        return value or None

    def required(self, key: str, **kw: Any) -> str:
        value = self.text(key, required=True, **kw)
        assert value is not None
        return value

    def params(self) -> Params:
        values = [
            self.text(f"param{i}", required=False, limit=MAX_PARAM_CHARS, numbers=True) or ""
            for i in range(1, 5)
        ]
        return (values[0], values[1], values[2], values[3])

    def int(self, key: str) -> int | None:
        return _int(self.data, key, f"data.{key}")

    def id(self) -> str | None:
        return self.text("id", required=False, limit=MAX_ID_CHARS, numbers=True) or None


def _number_text(value: float, key: str) -> str:
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ProtocolError(Code.INVALID_REQUEST, f"data.{key}: must be a string or an integer")
        value = int(value)
    return str(value)


def _int(data: dict[str, Any], key: str, label: str) -> int | None:
    """Integers that may arrive as numbers or decimal strings (``"50"``)."""
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ProtocolError(Code.INVALID_REQUEST, f"{label}: must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ProtocolError(Code.INVALID_REQUEST, f"{label}: must be an integer")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not (text.lstrip("-").isdigit() and text.isascii()) or len(text) > 19:
            raise ProtocolError(Code.INVALID_REQUEST, f"{label}: must be an integer")
        value = int(text)
    if not isinstance(value, int) or abs(value) > 2**53:
        raise ProtocolError(Code.INVALID_REQUEST, f"{label}: must be an integer")
    return value


def _request_otp(f: _Fields) -> RequestOtp:
    message = f.required("message", strip=False)
    check_template(message)
    return RequestOtp(
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        reference=f.required("reference", limit=MAX_REFERENCE_CHARS, numbers=True),
        message=message,
        params=f.params(),
        expiration=f.int("expiration"),
        subject=f.subject(),
        id=f.id(),
        date_time=f.int("date_time"),
    )


def _verify_otp(f: _Fields) -> VerifyOtp:
    return VerifyOtp(
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        reference=f.required("reference", limit=MAX_REFERENCE_CHARS, numbers=True),
        otp=f.required("otp", limit=32, numbers=True),
        params=f.params(),
        date_time=f.int("date_time"),
    )


def _send_sms(f: _Fields) -> SendSms:
    return SendSms(
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        message=f.required("message", strip=False),
        id=f.id(),
        expiration=f.int("expiration"),
        date_time=f.int("date_time"),
    )


def _send_email(f: _Fields) -> SendEmail:
    return SendEmail(
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        message=f.required("message", strip=False),
        subject=f.subject(),
        id=f.id(),
        expiration=f.int("expiration"),
        date_time=f.int("date_time"),
    )


def _send_message(f: _Fields) -> SendMessage:
    return SendMessage(
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        message=f.required("message", strip=False),
        subject=f.subject(),
        id=f.id(),
        expiration=f.int("expiration"),
        date_time=f.int("date_time"),
    )


def _block(f: _Fields) -> BlockMsisdn:
    receiver = f.required("receiver", limit=MAX_RECEIVER_CHARS, alias="msisdn", numbers=True)
    return BlockMsisdn(receiver=receiver, date_time=f.int("date_time"))


def _unblock(f: _Fields) -> UnblockMsisdn:
    receiver = f.required("receiver", limit=MAX_RECEIVER_CHARS, alias="msisdn", numbers=True)
    return UnblockMsisdn(receiver=receiver, date_time=f.int("date_time"))


def _modem_list(f: _Fields) -> GetModemList:
    return GetModemList(date_time=f.int("date_time"))


def _ussd(f: _Fields) -> RequestUssd:
    return RequestUssd(
        modem_id=f.required("modem_id", limit=128),
        ussd_code=f.required("ussd_code", limit=64),
        date_time=f.int("date_time"),
    )


def _handover(f: _Fields) -> Handover:
    channel = f.required("channel", limit=8)
    if channel not in ("sms", "email"):
        raise ProtocolError(Code.INVALID_REQUEST, "data.channel: must be sms or email")
    expiration = f.int("expiration")
    if expiration is None:
        raise ProtocolError(Code.INVALID_REQUEST, "data.expiration: is required")
    return Handover(
        id=f.required("id", limit=MAX_ID_CHARS),
        channel=channel,
        receiver=f.required("receiver", limit=MAX_RECEIVER_CHARS),
        subject=f.subject() or "",
        expiration=expiration,
        # Base64 of nonce + ciphertext + tag of a text of up to MAX_MESSAGE_CHARS.
        sealed=f.required("sealed", limit=4 * (4 * MAX_MESSAGE_CHARS + 64) // 3 + 4),
        date_time=f.int("date_time"),
    )


def _echo(f: _Fields) -> Echo:
    return Echo(data=f.data)


_PARSERS: dict[str, Any] = {
    "request-otp": _request_otp,
    "verify-otp": _verify_otp,
    "send-sms": _send_sms,
    "send-email": _send_email,
    "send-mail": _send_email,
    "send-message": _send_message,
    "block-msisdn": _block,
    "unblock-msisdn": _unblock,
    "get-modem-list": _modem_list,
    "request-ussd": _ussd,
    "echo": _echo,
    "handover": _handover,
}

COMMAND_NAMES = frozenset(_PARSERS)


def error_response(exc: ProtocolError) -> Response:
    return Response(exc.command or "unknown", exc.code, {}, exc.message)
