from __future__ import annotations

from otpd.delivery.channel import Job
from otpd.delivery.jobqueue import SCAN_LIMIT, JobQueue


def job(i: int, expires_at: float = 100.0, receiver: str = "+62") -> Job:
    return Job(i, "sms", receiver, "", "t", expires_at, 0, 0.0)


def test_fifo_and_reservation() -> None:
    q = JobQueue()
    for i in (1, 2, 3):
        q.add(job(i), due=0.0, now=0.0)
    a = q.reserve(1.0, None)
    b = q.reserve(1.0, None)
    assert a is not None and b is not None and (a.job.id, b.job.id) == (1, 2)
    assert q.reserve(1.0, lambda j: j.id != 3) is None  # filter refuses the only one left
    c = q.reserve(1.0, None)
    assert c is not None and c.job.id == 3
    assert q.reserve(1.0, None) is None
    assert len(q) == 3  # reserved jobs stay pending until removed
    q.remove(1)
    assert len(q) == 2


def test_release_delays_until_due() -> None:
    q = JobQueue()
    q.add(job(1), due=0.0, now=0.0)
    p = q.reserve(0.0, None)
    assert p is not None
    q.release(p, due=5.0, now=0.0)
    assert q.reserve(4.9, None) is None
    assert q.next_due() == 5.0
    again = q.reserve(5.0, None)
    assert again is not None and again.job.id == 1


def test_expiry_skips_reserved_until_released() -> None:
    q = JobQueue()
    q.add(job(1, expires_at=10.0), due=0.0, now=0.0)
    q.add(job(2, expires_at=10.0), due=0.0, now=0.0)
    held = q.reserve(0.0, None)
    assert held is not None and held.job.id == 1
    assert [p.job.id for p in q.pop_expired(11.0)] == [2]
    assert q.next_expiry() is None  # the held one is the channel's business
    q.release(held, due=11.0, now=11.0)
    assert [p.job.id for p in q.pop_expired(11.0)] == [1]
    assert len(q) == 0


def test_expired_jobs_are_never_reserved() -> None:
    q = JobQueue()
    q.add(job(1, expires_at=5.0), due=0.0, now=0.0)
    assert q.reserve(5.0, None) is None


def test_refusing_filter_looks_at_a_bounded_window() -> None:
    q = JobQueue()
    for i in range(SCAN_LIMIT + 10):
        q.add(job(i, receiver="+61" if i == SCAN_LIMIT + 5 else "+62"), due=0.0, now=0.0)
    seen: list[int] = []

    def accept(j: Job) -> bool:
        seen.append(j.id)
        return j.receiver == "+61"

    assert q.reserve(0.0, accept) is None
    assert len(seen) == SCAN_LIMIT
