"""The :class:`Analyzer`: snapshots and events in, a verdict per queue out.

For each queue the Analyzer keeps the previous observation and three
*episodes*, each a stretch of time during which one side owes the other
progress and makes none:

- the device episode: buffers are outstanding (``avail_idx != used_idx``)
  and ``used_idx`` does not move;
- the driver episode (VIRTIO_RING_F_EVENT_IDX): ``used_idx`` has passed the
  driver's ``used_event`` (a call was due, §2.7.7) and neither ``used_event``
  nor ``avail_idx`` moves; for a packed queue whose driver's event flags
  are ENABLE (§2.8.10): the device returned descriptors and sent no call
  since (rules.calls_owed);
- the starvation episode (a queue the driver fills): the device has no
  buffer left and ``avail_idx`` does not move.

An episode remembers when it started (the snapshot that first showed it; for
a state present at the first snapshot, that time "at least") and the
``kicks``/``calls``/``dropped`` counters and ``shadow_avail_idx`` of the
snapshot before it, so "no kick since the entries appeared" is a difference
of two counters. The rules (:mod:`inspector.analysis.rules`) turn an episode
older than :attr:`Thresholds.stall_s` into a verdict. Memory per queue is
constant; the work per queue per snapshot is a few comparisons, and strings
are built only for queues that are not healthy. Packed queues (§2.8) go
through the same episodes with their positions as counters
(rules.Observation).

A block queue whose source counts bad requests (``extras["blk"]``, vqscope's
blk back-end) also keeps those counters as it first saw them
(rules.BlkWatch): when the ring rules find nothing, growth since then is
``io_error`` (the host I/O failed: the backing store) or ``bad_requests``
(the driver sent malformed requests; each kind, its meaning and status).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..events import Event
from ..snapshot.model import QueueEntry, QueueId, Snapshot
from .roles import Role, role_of
from .rules import BlkWatch, Episode, Observation, blk_bad_counts, blk_verdict, calls_owed, judge
from .verdict import Diagnosis, Verdict


@dataclass(frozen=True)
class Thresholds:
    """The Analyzer's options. ``stall_s``: seconds a side may owe progress
    before it counts as stuck (device_stalled, kick_missing, call_missing,
    driver_stalled, starved, suppression_stuck); ``broken_snapshots``:
    consecutive snapshots a decoder anomaly must be seen in before
    ring_broken (a read of a running guest's ring can tear once);
    ``active_s``: a queue whose indices moved within this many seconds is
    ``healthy``, otherwise ``idle``; ``window_s``: seconds of history a
    consumer (the TUI's sparklines) keeps."""

    stall_s: float = 2.0
    broken_snapshots: int = 2
    active_s: float = 5.0
    window_s: float = 60.0


class _Track:
    """One queue's state between snapshots."""

    __slots__ = ("prev", "device_ep", "driver_ep", "starve_ep", "broken_streak", "moved_t",
                 "last_call_used", "diagnosis", "blk")

    def __init__(self) -> None:
        self.prev: Observation | None = None
        self.device_ep: Episode | None = None
        self.driver_ep: Episode | None = None
        self.starve_ep: Episode | None = None
        self.broken_streak = 0
        self.moved_t: float | None = None      # last time avail_idx or used_idx moved
        self.last_call_used: int | None = None  # used_idx of the last call event seen
        self.diagnosis: Diagnosis | None = None
        self.blk: BlkWatch | None = None        # a block queue's bad-request counters when first seen


class Analyzer:
    """Keeps a bounded state per queue and a :class:`Diagnosis` for each.

    ``notifications_seen``: whether the source's ``kicks``/``calls``
    counters and kick/call events are real (a source with events: vqscope's
    back-end, the vhost-net probes); without them the rules that need kicks
    or calls say "cannot tell". A snapshot whose ``extras`` say
    ``"notifications_counted": false`` (a proxy that passes the eventfds
    through uncounted) is judged as from a source without them, whatever
    ``notifications_seen`` says. Feed it with :meth:`update` in time order.
    Queues that leave the snapshot are forgotten.
    """

    def __init__(self, thresholds: Thresholds = Thresholds(), notifications_seen: bool = False):
        self.thresholds = thresholds
        self.notifications_seen = notifications_seen
        self._tracks: dict[QueueId, _Track] = {}

    def update(self, snap: Snapshot, events: Sequence[Event] = ()) -> list[Diagnosis]:
        """Take one snapshot (and the events seen since the previous one);
        returns the diagnoses whose verdict changed (a queue seen the first
        time included), in the snapshot's queue order."""
        tracks = self._tracks
        if events:
            self._take_events(events)
        changed: list[Diagnosis] = []
        counts: dict[str, int] = {}
        for q in snap.queues:
            counts[q.device] = counts.get(q.device, 0) + 1
        seen = set()
        now = snap.time
        counted = self.notifications_seen and snap.extras.get("notifications_counted") is not False
        for q in snap.queues:
            qid = (q.device, q.index)
            seen.add(qid)
            tr = tracks.get(qid)
            if tr is None:
                tr = tracks[qid] = _Track()
            role = role_of(q.device_type, q.index, counts[q.device])
            d = self._judge(tr, q, role, now, counted)
            old = tr.diagnosis
            if old is None or old.verdict is not d.verdict:
                changed.append(d)
            elif d.ok:
                d = old  # unchanged, nothing new to say
            tr.diagnosis = d
        if len(seen) != len(tracks):
            for qid in [k for k in tracks if k not in seen]:
                del tracks[qid]
        return changed

    def _take_events(self, events: Sequence[Event]) -> None:
        """Keep, per queue, the ``used_idx`` its last call event carried
        (inspector.events: a call's value is used_idx, 0 when unknown)."""
        last = {(ev.device, ev.queue): ev.value for ev in events if ev.kind == "call" and ev.value}
        tracks = self._tracks
        for qid, value in last.items():
            tr = tracks.get(qid)
            if tr is None:
                tr = tracks[qid] = _Track()
            tr.last_call_used = value & 0xFFFF

    def _judge(self, tr: _Track, q: QueueEntry, role: Role, now: float, counted: bool) -> Diagnosis:
        ob = Observation.of(q, now)
        prev = tr.prev
        # --- when did the indices last move (healthy vs idle)
        if prev is None:
            tr.moved_t = None
        elif ob.avail_idx != prev.avail_idx or ob.used_idx != prev.used_idx:
            tr.moved_t = now
        # --- episodes: start, continue or end
        tr.device_ep = _step(tr.device_ep, prev, ob, ob.device_owes(), ob.device_progress(prev),
                             tr.last_call_used)
        if ob.calls_each:
            tr.driver_ep = _step(tr.driver_ep, prev, ob, calls_owed(ob, prev, tr.driver_ep, counted),
                                 False, None)
        else:
            tr.driver_ep = _step(tr.driver_ep, prev, ob, ob.driver_owes(), ob.driver_progress(prev),
                                 tr.last_call_used)
        tr.starve_ep = _step(tr.starve_ep, prev, ob, role is Role.FILL and ob.no_buffers(),
                             prev is not None and ob.avail_idx != prev.avail_idx, tr.last_call_used)
        tr.prev = ob
        tr.broken_streak = tr.broken_streak + 1 if ob.breaking else 0
        # A call event's value is a split used_idx (inspector.events); not read for packed.
        verdict, evidence, since = judge(q, ob, role, tr.device_ep, tr.driver_ep, tr.starve_ep,
                                         tr.broken_streak, None if ob.packed else tr.last_call_used,
                                         counted, self.thresholds)
        bad = blk_bad_counts(q)
        if bad is not None:
            if tr.blk is None:
                tr.blk = BlkWatch(dict(bad))
            elif verdict is None:   # a ring that does not move is said first
                verdict, evidence, since = blk_verdict(bad, tr.blk, now)
        if verdict is None:
            active = tr.moved_t is not None and now - tr.moved_t < self.thresholds.active_s
            verdict = Verdict.HEALTHY if active else Verdict.IDLE
            old = tr.diagnosis
            since = old.since if old is not None and old.verdict is verdict else now
            evidence = ""
        else:
            old = tr.diagnosis
            if since is None:
                since = old.since if old is not None and old.verdict is verdict else now
        return Diagnosis(q.device, q.index, verdict, since, evidence, role.value, now)

    @property
    def diagnoses(self) -> dict[QueueId, Diagnosis]:
        """The current diagnosis of every queue of the last snapshot."""
        return {qid: tr.diagnosis for qid, tr in self._tracks.items() if tr.diagnosis is not None}

    def diagnosis(self, qid: QueueId) -> Diagnosis | None:
        """The current diagnosis of one queue, or None."""
        tr = self._tracks.get(qid)
        return tr.diagnosis if tr is not None else None


def _step(ep: Episode | None, prev: Observation | None, ob: Observation, owes: bool, progress: bool,
          last_call_used: int | None) -> Episode | None:
    """The episode after ``ob``: ended when nothing is owed, restarted when
    there was progress, started when something became owed."""
    if not owes:
        return None
    if ep is None or progress:
        return Episode.start(prev, ob, last_call_used)
    return ep


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
