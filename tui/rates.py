"""Per-queue rates (kicks/s, calls/s, packets/s) from two snapshots.

Pure functions over the snapshot JSON of README.md: the rate of a counter is
its increase divided by the increase of the snapshots' ``time`` field. A rate
is ``None`` (shown as "—") when it cannot be known: no earlier snapshot of
that queue, time that did not advance, or a counter that went down (the
back-end restarted and its counters began again).
"""

from __future__ import annotations

from dataclasses import dataclass

QueueId = tuple[str, int]
"""A queue's identity across snapshots: ``(device, index)``."""


@dataclass(frozen=True)
class QueueRates:
    """Events per second of one queue between two snapshots."""

    kicks: float | None = None
    calls: float | None = None
    packets: float | None = None


NO_RATES = QueueRates()


def queue_id(queue: dict) -> QueueId:
    """The identity of a queue dict of a snapshot."""
    return (queue["device"], queue["index"])


def per_second(prev_count: int, count: int, prev_time: float, time: float) -> float | None:
    """``(count − prev_count) / (time − prev_time)``, or None when the time
    did not advance or the counter went down (it was reset)."""
    dt = time - prev_time
    if dt <= 0 or count < prev_count:
        return None
    return (count - prev_count) / dt


def queue_rates(prev: dict | None, cur: dict) -> dict[QueueId, QueueRates]:
    """Rates of every queue of ``cur`` relative to the same queue in ``prev``
    (a snapshot dict or None); a queue absent from ``prev`` gets NO_RATES."""
    if prev is None:
        return {queue_id(q): NO_RATES for q in cur["queues"]}
    before = {queue_id(q): q for q in prev["queues"]}
    t0, t1 = prev["time"], cur["time"]
    out: dict[QueueId, QueueRates] = {}
    for q in cur["queues"]:
        p = before.get(queue_id(q))
        if p is None:
            out[queue_id(q)] = NO_RATES
            continue
        out[queue_id(q)] = QueueRates(
            kicks=per_second(p["kicks"], q["kicks"], t0, t1),
            calls=per_second(p["calls"], q["calls"], t0, t1),
            packets=per_second(p["packets"], q["packets"], t0, t1),
        )
    return out
