"""The :class:`Analyzer`: snapshots and events in, a verdict per queue out.

(API frozen for the helpers; the rules are being written.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..events import Event
from ..snapshot.model import QueueId, Snapshot
from .verdict import Diagnosis, Verdict


@dataclass(frozen=True)
class Thresholds:
    """The Analyzer's options. ``stall_s``: seconds without progress before
    buffers that wait count as stuck (device_stalled, kick_missing,
    call_missing, driver_stalled, starved, suppression_stuck); ``broken_snapshots``:
    consecutive snapshots a decoder anomaly must be seen in before
    ring_broken (a remote read can tear once); ``window_s``: seconds of
    history kept per queue (and the sparkline's span)."""

    stall_s: float = 2.0
    broken_snapshots: int = 2
    window_s: float = 60.0


class Analyzer:
    """Keeps a bounded window per queue and a :class:`Diagnosis` for each.

    ``notifications_seen``: whether the source's ``kicks``/``calls`` counters
    and kick/call events are real (a source with events: vqscope's back-end,
    vhost-net probes); without them the rules that need kicks or calls say
    "cannot tell". Feed it with :meth:`update` in time order.
    """

    def __init__(self, thresholds: Thresholds = Thresholds(), notifications_seen: bool = False):
        self.thresholds = thresholds
        self.notifications_seen = notifications_seen
        self._diagnoses: dict[QueueId, Diagnosis] = {}

    def update(self, snap: Snapshot, events: Sequence[Event] = ()) -> list[Diagnosis]:
        """Take one snapshot (and the events seen since the previous one);
        returns the diagnoses whose verdict changed (a queue seen the first
        time included), in queue order."""
        changed = []
        for q in snap.queues:
            v = Verdict.HEALTHY if q.inflight else Verdict.IDLE
            old = self._diagnoses.get(q.id)
            if old is None or old.verdict is not v:
                d = Diagnosis(q.device, q.index, v, since=snap.time, time=snap.time)
                changed.append(d)
            else:
                d = old
            self._diagnoses[q.id] = d
        return changed

    @property
    def diagnoses(self) -> dict[QueueId, Diagnosis]:
        """The current diagnosis of every queue seen in the last snapshot."""
        return dict(self._diagnoses)

    def diagnosis(self, qid: QueueId) -> Diagnosis | None:
        """The current diagnosis of one queue, or None."""
        return self._diagnoses.get(qid)


def verdict_timeline(frames: Iterable[tuple[Snapshot, Sequence[Event]]],
                     thresholds: Thresholds = Thresholds(),
                     notifications_seen: bool = False) -> list[Diagnosis]:
    """Every verdict change over ``frames`` (snapshot, events since the
    previous one), in time order: the first diagnosis of each queue, then
    each change."""
    a = Analyzer(thresholds, notifications_seen)
    out: list[Diagnosis] = []
    for snap, events in frames:
        out.extend(a.update(snap, events))
    return out
