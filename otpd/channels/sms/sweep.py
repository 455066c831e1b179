"""When to delete the copies a modem stores of what it sends: a pure policy.

Stored copies. Some modems keep a copy of every part they send in the SMS
storage (STO SENT), other software leaves some (STO UNSENT), and a full
storage makes a modem refuse to send (``+CMS ERROR: 322``) and to receive. A
sweep (``Modem.cleanup_sent``: ``AT+CMGL=2``, ``AT+CMGL=3``, one ``AT+CMGD``
per copy, ``AT+CPMS?``) deletes them and never touches received messages, but
it costs several exchanges, tens of milliseconds each on a real modem, so the
driver does not sweep after every send. It sweeps:

- at ``open()``, and right after the first send after ``open()``: that sweep
  also learns whether this modem keeps copies of what it sends;
- a modem that keeps copies: right after a send only when the next message
  (up to ``max_parts`` parts) might not fit in the slots that were free at the
  last sweep (after every send if ``AT+CPMS?`` does not tell), and otherwise
  when the modem is idle (the pool calls
  ``cleanup_sent`` once ``idle_sweep_at()`` has passed; ``sweep_wanted`` tells
  it a send left copies behind);
- a modem that keeps none: when idle after every ``RECHECK_PARTS`` parts, in
  case it keeps some after all (e.g. failed sends as STO UNSENT);
- and whatever slips through: a send refused with "memory full" sweeps and is
  retried once on the same modem.

``SweepPolicy`` holds that bookkeeping; the driver reports events to it
(opened, part sent, sweep done) and asks it the questions above. Times are
the caller's clock values; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# A modem that kept no copy of a sent part is still swept (when idle) after this many.
RECHECK_PARTS = 50


@dataclass
class SweepPolicy:
    delete_sent: bool  # False: the user keeps stored copies; never sweep
    max_parts: int  # the most parts one message may need
    parts_since_sweep: int = 0
    keeps_copies: bool | None = None  # None: not learned since opened()
    free_slots: int | None = None  # at the last sweep; None: unknown
    sending: int = 0  # sends in progress
    last_send_end: float = 0.0

    # --- events -------------------------------------------------------------------

    def opened(self) -> None:
        """The port was (re)opened: another modem or SIM may be behind it now."""
        self.keeps_copies = None
        self.free_slots = None
        self.parts_since_sweep = 0

    def send_started(self) -> None:
        self.sending += 1

    def part_sending(self) -> None:
        """A part goes out; counted even when refused, as it may leave a copy."""
        self.parts_since_sweep += 1

    def send_ended(self, now: float) -> None:
        self.sending -= 1
        self.last_send_end = now

    def sweep_started(self) -> int:
        """A sweep begins; the parts it covers (give them back if it fails)."""
        parts, self.parts_since_sweep = self.parts_since_sweep, 0
        return parts

    def sweep_failed(self, parts: int) -> None:
        """Nothing learned: those parts are swept again later."""
        self.parts_since_sweep += parts

    def sweep_done(self, parts: int, deleted: int, free_slots: int | None) -> None:
        """``parts`` from sweep_started(); ``free_slots`` as AT+CPMS? told (None: unknown)."""
        self.free_slots = free_slots
        if parts:
            # Only a sweep after sends tells whether sends leave copies.
            self.keeps_copies = deleted > 0

    # --- questions ------------------------------------------------------------------

    def sweep_due(self) -> bool:
        """Stored copies may be waiting for a sweep."""
        if not self.delete_sent or self.parts_since_sweep == 0:
            return False
        return self.keeps_copies is not False or self.parts_since_sweep >= RECHECK_PARTS

    def idle_sweep_at(self, idle: float) -> float | None:
        """Time after which a due sweep can run (``idle`` s after the last send)."""
        if self.sending or not self.sweep_due():
            return None
        return self.last_send_end + idle

    def sweep_now(self) -> bool:
        """Right after a send: must the sweep run before the next send?"""
        if not self.delete_sent or self.parts_since_sweep == 0:
            return False
        if self.keeps_copies is None:
            return True  # the first send since opened(): learn whether copies are kept
        if not self.keeps_copies:
            return False
        free = self.free_slots
        return free is None or self.parts_since_sweep + self.max_parts > free

    def sweep_when_full(self, swept: bool) -> bool:
        """A part refused with "memory full": sweep and retry it? (once per part)."""
        return self.delete_sent and not swept
