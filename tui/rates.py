"""Per-queue rates (kicks/s, calls/s, packets/s) from two snapshots.

Pure functions over snapshots (inspector.snapshot.model): the rate of a
counter is its increase divided by the increase of the snapshots' ``time``.
A rate
is ``None`` (shown as "—") when it cannot be known: no earlier snapshot of
that queue, time that did not advance, or a counter that went down (the
back-end restarted and its counters began again). :class:`RateHistory`
keeps them over the last minute for the queue screen's sparklines.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from inspector.errors import InspectorError
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


class RateHistory:
    """The rates of every queue over the last ``window_s`` seconds (by
    snapshot time), for the queue screen's sparklines: per queue a deque of
    ``(time, QueueRates)``, oldest first, bounded by the window and by
    ``max_samples``. Fed by the app with each new snapshot's rates."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 1200):
        if not window_s > 0:
            raise InspectorError(f"rate history window must be more than 0 s, got {window_s}")
        self.window_s = window_s
        self.max_samples = max_samples
        self._queues: dict[QueueId, deque[tuple[float, QueueRates]]] = {}
        #: The time of the last record() (None before the first, or after clear()).
        self.last_time: float | None = None

    def record(self, time: float, rates: dict[QueueId, QueueRates]) -> None:
        """Add the rates of one snapshot taken at ``time`` (s); queues not
        in ``rates`` are dropped (they left the snapshot)."""
        horizon = time - self.window_s
        queues = self._queues
        for qid in queues.keys() - rates.keys():
            del queues[qid]
        for qid, r in rates.items():
            d = queues.get(qid)
            if d is None:
                d = queues[qid] = deque(maxlen=self.max_samples)
            d.append((time, r))
            while d[0][0] < horizon:
                d.popleft()
        self.last_time = time

    def clear(self) -> None:
        """Forget everything (a replay jumped: the history is not continuous)."""
        self._queues.clear()
        self.last_time = None

    def series(self, qid: QueueId, field: str, bins: int = 60) -> list[float]:
        """``field`` (``kicks``, ``calls`` or ``packets``) of queue ``qid``
        over the window, as ``bins`` equal time bins ending at the last
        record, oldest first: each bin the mean of the known rates in it, 0
        where none is known (no sample, or a rate that could not be told)."""
        d = self._queues.get(qid)
        out = [0.0] * bins
        if not d or self.last_time is None:
            return out
        sums, counts = [0.0] * bins, [0] * bins
        start = self.last_time - self.window_s
        width = self.window_s / bins
        for t, r in d:
            v = getattr(r, field)
            if v is None:
                continue
            b = min(bins - 1, max(0, int((t - start) / width)))
            sums[b] += v
            counts[b] += 1
        return [s / c if c else 0.0 for s, c in zip(sums, counts)]
