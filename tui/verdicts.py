"""A recording's verdict changes, for the replay: where each queue's verdict
changed, the diagnoses at any cursor time, and the snapshots that ``n``/``N``
stop at.

:func:`read_verdict_timeline` is the one place the replay gets its verdict
changes from: ``ReplaySource.verdict_changes()`` (the recorder's, or
computed over the recording for a file without them).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from inspector.analysis import Diagnosis, Thresholds
from inspector.recording import Recording
from inspector.snapshot.model import QueueId
from inspector.sources.replay import ReplaySource


class VerdictTimeline:
    """The verdict changes of a recording over its snapshot ``times``
    (ascending, s since the epoch, one per snapshot index).

    ``changes``: every change, time-ordered; ``stops``: the snapshot indices
    where a verdict changed, ascending, without a queue's first diagnosis
    when that was healthy or idle (that is no news); ``notifications_seen``:
    whether the recorded source saw kicks and calls.
    """

    def __init__(self, changes: Sequence[Diagnosis], times: Sequence[float], notifications_seen: bool = False):
        self.changes = sorted(changes, key=lambda d: d.time)
        self.times = list(times)
        self.notifications_seen = notifications_seen
        self._by_queue: dict[QueueId, tuple[list[float], list[Diagnosis]]] = {}
        news = []
        for d in self.changes:
            ts, ds = self._by_queue.setdefault(d.id, ([], []))
            if ds or not d.ok:
                news.append(d)
            ts.append(d.time)
            ds.append(d)
        #: The changes that are news (``stops``' diagnoses), time-ordered.
        self.news = news
        self._news_times = [d.time for d in news]
        self.stops = sorted({self.index_of(d.time) for d in news})

    def index_of(self, t: float) -> int:
        """The index of the last snapshot at or before ``t`` (0 before the first)."""
        return max(0, bisect.bisect_right(self.times, t) - 1)

    def at(self, t: float) -> dict[QueueId, Diagnosis]:
        """Each queue's diagnosis in force at time ``t`` (its last change at
        or before ``t``); queues first diagnosed after ``t`` are absent."""
        out = {}
        for qid, (ts, ds) in self._by_queue.items():
            k = bisect.bisect_right(ts, t)
            if k:
                out[qid] = ds[k - 1]
        return out

    def previous(self, d: Diagnosis) -> Diagnosis | None:
        """The diagnosis of ``d``'s queue before ``d``, or None (first sight)."""
        ts, ds = self._by_queue.get(d.id, ([], []))
        k = bisect.bisect_left(ts, d.time)
        return ds[k - 1] if k > 0 else None

    def last_news(self, t: float) -> Diagnosis | None:
        """The last change that is news at or before time ``t``, or None."""
        k = bisect.bisect_right(self._news_times, t)
        return self.news[k - 1] if k else None


def read_verdict_timeline(source: ReplaySource, thresholds: Thresholds | None = None) -> VerdictTimeline:
    """The :class:`VerdictTimeline` of the recording ``source`` plays: its
    ``verdict_changes`` (the recorder's, or computed with ``thresholds`` when
    given or when the file has none); the recorded source's ``has_events``
    (its header) says whether kicks and calls were seen. Reads the whole
    recording: call it from a worker. Raises the reader's RecordingError, or
    SnapshotFormatError on a damaged snapshot."""
    with Recording(source.path) as rec:
        seen = bool(rec.header.get("has_events", False))
        times = rec.snapshot_times()
    changes = source.verdict_changes() if thresholds is None else source.verdict_changes(thresholds)
    return VerdictTimeline(changes, times, seen)
