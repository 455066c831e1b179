"""A signed broker command runs at most once: the replay guard.

A signature proves who made a command, not that it is new: a captured signed
``unblock-msisdn`` published again within the signature window would undo a
block. So every accepted signature is remembered in the store (shared by the
nodes with the Redis store) until its window ends, and a second copy is
refused.

Remembering happens in three steps so that a crash never loses a command:
``claim`` before running it (a pending claim that expires on its own if this
process dies), ``settle`` once it is durably stored (from then on any copy is
a replay), or ``release`` when it could not be stored (the broker's
redelivery then runs it). A copy that arrives while another holder's claim is
pending is ``BUSY``: the broker should hand it back later, not drop it, since
that holder may yet fail.
"""

from __future__ import annotations

import os
import secrets
import socket

from otpd.store import Claim, Store
from otpd.wire.signing import MAX_SKEW

__all__ = ["CLAIM_TTL", "Claim", "ReplayGuard"]

# s a claim stays pending without being settled: longer than a command takes
# to be stored, short enough that a crashed holder's commands run soon after.
CLAIM_TTL = 30.0
# s after a signature's timestamp that it is still remembered (the clock check
# accepts up to MAX_SKEW either way; a little margin for clocks in between).
REMEMBER_AFTER = MAX_SKEW + 60.0


def _holder() -> str:
    # Unique per process: after a restart, our own old claims are a dead holder's.
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class ReplayGuard:
    def __init__(self, store: Store, holder: str | None = None) -> None:
        self.store = store
        self.holder = holder or _holder()

    async def claim(self, key: str, now: float) -> Claim:
        return await self.store.claim_command(key, self.holder, now, CLAIM_TTL)

    async def settle(self, key: str, stamp: float, now: float) -> None:
        """Remember ``key`` until its signature could no longer pass the clock check."""
        until = max(stamp, now) + REMEMBER_AFTER
        await self.store.settle_command(key, self.holder, until)

    async def release(self, key: str) -> None:
        await self.store.release_command(key, self.holder)
