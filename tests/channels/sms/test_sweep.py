"""The stored-copy sweep policy (sweep.py), event by event, without a modem."""

from __future__ import annotations

from otpd.channels.sms.sweep import RECHECK_PARTS, SweepPolicy


def sent(policy: SweepPolicy, parts: int, now: float) -> None:
    policy.send_started()
    for _ in range(parts):
        policy.part_sending()
    policy.send_ended(now)


def swept(policy: SweepPolicy, deleted: int, free: int | None) -> None:
    policy.sweep_done(policy.sweep_started(), deleted, free)


def test_first_send_after_open_sweeps_and_learns() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6)
    p.opened()
    swept(p, 0, 30)  # the sweep at open(): no sends yet, nothing learned
    assert p.keeps_copies is None and p.free_slots == 30 and not p.sweep_now()
    sent(p, 1, 5.0)
    assert p.sweep_now()
    swept(p, 1, 29)
    assert p.keeps_copies is True and not p.sweep_due()


def test_modem_that_keeps_copies_sweeps_when_next_message_might_not_fit() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6, keeps_copies=True, free_slots=10)
    sent(p, 4, 1.0)
    assert not p.sweep_now()  # 4 + 6 <= 10
    assert p.sweep_due() and p.idle_sweep_at(2.0) == 3.0
    sent(p, 1, 4.0)
    assert p.sweep_now()  # 5 + 6 > 10


def test_unknown_free_slots_sweep_after_every_send() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=1, keeps_copies=True, free_slots=None)
    sent(p, 1, 1.0)
    assert p.sweep_now()


def test_modem_without_copies_rechecks_when_idle() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6, keeps_copies=False, free_slots=30)
    sent(p, RECHECK_PARTS - 1, 1.0)
    assert not p.sweep_now() and not p.sweep_due() and p.idle_sweep_at(1.0) is None
    sent(p, 1, 7.5)
    assert not p.sweep_now() and p.sweep_due() and p.idle_sweep_at(1.0) == 8.5
    swept(p, 0, 30)
    assert p.keeps_copies is False and p.parts_since_sweep == 0 and not p.sweep_due()


def test_no_idle_sweep_while_sending() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6, keeps_copies=True, free_slots=30)
    sent(p, 1, 1.0)
    p.send_started()
    assert p.sweep_due() and p.idle_sweep_at(1.0) is None
    p.send_ended(2.0)
    assert p.idle_sweep_at(1.0) == 3.0


def test_failed_sweep_gives_the_parts_back() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6, keeps_copies=True, free_slots=30)
    sent(p, 3, 1.0)
    parts = p.sweep_started()
    assert parts == 3 and p.parts_since_sweep == 0
    p.part_sending()  # a send went on meanwhile
    p.sweep_failed(parts)
    assert p.parts_since_sweep == 4 and p.keeps_copies is True


def test_open_forgets_what_was_learned() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6, keeps_copies=False, free_slots=5,
                    parts_since_sweep=3)
    p.opened()
    assert (p.keeps_copies, p.free_slots, p.parts_since_sweep) == (None, None, 0)


def test_delete_sent_off_never_sweeps() -> None:
    p = SweepPolicy(delete_sent=False, max_parts=6)
    sent(p, RECHECK_PARTS + 1, 1.0)
    assert not p.sweep_now() and not p.sweep_due() and p.idle_sweep_at(0.0) is None
    assert not p.sweep_when_full(swept=False)


def test_memory_full_sweeps_once_per_part() -> None:
    p = SweepPolicy(delete_sent=True, max_parts=6)
    assert p.sweep_when_full(swept=False)
    assert not p.sweep_when_full(swept=True)
