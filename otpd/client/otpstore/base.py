"""The local OTP store of ``manage_otp`` mode: records and the interface.

A record holds only the salt and the keyed hash (``otpd.otp.otp_digest``),
never the code. Every state change is atomic in the backend (SQLite
transaction, Redis script), so several processes or app servers sharing
one store count attempts exactly and consume an OTP at most once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from otpd.otp_attempts import VerifyResult


@dataclass(frozen=True)
class StoredOtp:
    reference: str
    salt: bytes
    digest: bytes
    expires_at: float  # unix s
    keep_until: float  # unix s; after it the record (and the reference) is forgotten


Matcher = Callable[[StoredOtp], bool]


class OtpStore(ABC):
    @abstractmethod
    async def insert(self, otp: StoredOtp, now: float) -> bool:
        """Add ``otp``; False if its reference is already in the store (1201)."""

    @abstractmethod
    async def discard(self, reference: str, salt: bytes) -> None:
        """Remove the record of ``reference`` if it is still the one with ``salt``
        (a failed publish: the app may retry with the same reference)."""

    @abstractmethod
    async def verify(self, reference: str, now: float, matches: Matcher,
                     max_attempts: int) -> VerifyResult:
        """Check a code atomically: a match consumes the OTP, a wrong code counts
        one attempt and the ``max_attempts``-th burns it."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections or files."""


__all__ = ["Matcher", "OtpStore", "StoredOtp", "VerifyResult"]
