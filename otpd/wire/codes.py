"""Response codes of the wire protocol (seed document plus otpd's extensions)."""

from enum import StrEnum


class Code(StrEnum):
    SUCCESS = "0000"
    SERIAL_PORT_NULL = "1000"  # no SMS modem is configured at all
    UNAUTHORIZED = "1100"
    NO_DEVICE_CONNECTED = "1101"  # no modem could take the message before it expired
    FAILED = "1102"
    PENDING = "1111"  # accepted and durably queued, delivery still pending
    DUPLICATED = "1201"
    INVALID_OTP = "1202"
    EXPIRED = "1203"
    TOO_MANY_ATTEMPTS = "1204"
    INVALID_REQUEST = "1300"
    UNKNOWN_COMMAND = "1301"
    BLOCKED = "1400"
    RATE_LIMITED = "1401"
