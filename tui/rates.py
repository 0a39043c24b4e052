"""Per-queue rates (kicks/s, calls/s, packets/s) from two snapshots.

Pure functions over snapshots (inspector.snapshot.model): the rate of a
counter is its increase divided by the increase of the snapshots' ``time``.
A rate
is ``None`` (shown as "—") when it cannot be known: no earlier snapshot of
that queue, time that did not advance, or a counter that went down (the
back-end restarted and its counters began again).
"""

from __future__ import annotations

from dataclasses import dataclass

from inspector.snapshot.model import QueueId, Snapshot


@dataclass(frozen=True)
class QueueRates:
    """Events per second of one queue between two snapshots."""

    kicks: float | None = None
    calls: float | None = None
    packets: float | None = None


NO_RATES = QueueRates()


def per_second(prev_count: int, count: int, prev_time: float, time: float) -> float | None:
    """``(count − prev_count) / (time − prev_time)``, or None when the time
    did not advance or the counter went down (it was reset)."""
    dt = time - prev_time
    if dt <= 0 or count < prev_count:
        return None
    return (count - prev_count) / dt


def queue_rates(prev: Snapshot | None, cur: Snapshot) -> dict[QueueId, QueueRates]:
    """Rates of every queue of ``cur`` relative to the same queue in ``prev``
    (a snapshot or None); a queue absent from ``prev`` gets NO_RATES."""
    if prev is None:
        return {q.id: NO_RATES for q in cur.queues}
    before = {q.id: q for q in prev.queues}
    t0, t1 = prev.time, cur.time
    out: dict[QueueId, QueueRates] = {}
    for q in cur.queues:
        p = before.get(q.id)
        if p is None:
            out[q.id] = NO_RATES
            continue
        out[q.id] = QueueRates(
            kicks=per_second(p.kicks, q.kicks, t0, t1),
            calls=per_second(p.calls, q.calls, t0, t1),
            packets=per_second(p.packets, q.packets, t0, t1),
        )
    return out
