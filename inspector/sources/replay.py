"""A recording (``vqscope record -o FILE``) as a source, with a time cursor.

:class:`ReplaySource` answers ``snapshot()`` with the recorded snapshot at
its cursor, exactly as recorded (README.md, "Snapshot JSON"; parsed by
inspector.snapshot.codec), and moves the
cursor on request: play (recorded time advances with wall time, times a
speed), pause, step one snapshot, jump to the previous/next snapshot at
which a new anomaly appeared, jump to start/end, or seek to an index or a
time. It reads the file through :class:`inspector.recording.Recording`
and holds no UI code; the TUI (tui/app.py, ``ReplayApp``) polls it from a
worker thread while key handlers move the cursor from the UI thread: the
cursor has its own lock, never held while the file is read.

Indices are 0-based, as the reader's; people see them 1-based ("snapshot
1/340"), and :meth:`ReplaySource.seek_spec` (``--at``) takes that form.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from ..analysis import Diagnosis, Thresholds
from ..errors import InspectorError, SnapshotFormatError, SourceError
from ..events import Event
from ..recording import Recording
from ..recording.reader import to_ns  # noqa: F401  (re-exported: the TUI's and tests' name for it)
from ..snapshot.codec import from_json
from ..snapshot.model import Snapshot
from .base import Source

#: Playback speeds (recorded seconds per wall-clock second) that ``faster()``
#: and ``slower()`` step through; 1.0 is real time and the default.
SPEEDS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)

EventKey = tuple[str, int, str]
"""``(device, queue, kind)``, the key of the reader's ``event_counts``."""


@dataclass(frozen=True)
class Cursor:
    """Where a replay stands; immutable, so the UI can compare two of them.

    ``index`` (0-based) of ``count`` snapshots; ``time`` is that snapshot's
    recorded ``time`` (s since the epoch), ``start``/``end`` the first and
    last snapshot's. ``anomaly`` is true when a new anomaly appeared at this
    snapshot; ``anomalies_seen`` of ``anomalies`` such snapshots are at or
    before it. ``speed`` is recorded seconds per wall second.
    """

    index: int
    count: int
    time: float
    start: float
    end: float
    playing: bool
    speed: float
    anomaly: bool
    anomalies_seen: int
    anomalies: int


@dataclass(frozen=True)
class ReplayFrame:
    """Everything the TUI shows for one cursor position.

    ``previous`` is the snapshot before the cursor's (None at the first), so
    rates cover the recorded interval ending at the cursor whatever way the
    cursor came there. ``event_counts`` are the recorded events in that
    interval, ``(device, queue, kind) → count``; ``event_keys`` every
    ``(device, queue, kind)`` the recording holds any event of, so that a
    count of 0 can be told from "this source records no such events".
    """

    cursor: Cursor
    snapshot: Snapshot
    previous: Snapshot | None
    event_counts: dict[EventKey, int]
    event_keys: frozenset[EventKey]


class ReplaySource(Source):
    """The snapshots, events and vhost-user messages of the recording at
    ``path``, served at a movable cursor (initially the first snapshot, paused).

    ``recording`` is an open reader to use instead of opening ``path`` (it is
    closed with this source); ``clock`` gives wall time in seconds (default
    ``time.monotonic``) for playback. Raises SourceError when ``path`` does
    not exist, holds no snapshot, or holds one that is not a Snapshot JSON
    object, and the reader's RecordingError when it is not a recording.
    """

    has_events = True
    has_messages = True

    def __init__(self, path: str, recording=None, clock: Callable[[], float] = _time.monotonic):
        if recording is None:
            if not os.path.isfile(path):
                raise SourceError(f"no recording at {path}: no such file (make one with `vqscope record -o FILE`)")
            recording = Recording(path)
        self.path = path
        self.file_name = os.path.basename(path)
        self._rec = recording
        self._clock = clock
        # Two locks: _lock guards the cursor (keys move it from the UI thread
        # and must never wait for the file), _read_lock the reader (one
        # SQLite connection, used from the app's poll worker).
        self._lock = threading.RLock()
        self._read_lock = threading.RLock()
        try:
            self._times = list(recording.snapshot_times())
            if not self._times:
                raise SourceError(f"recording {path} holds no snapshot yet (the recorder stopped before its "
                                  f"first flush?); nothing to replay")
            self._anomalies = sorted(set(recording.anomaly_indices()))
            self._cache: dict[int, Snapshot] = {}
            first = self._snapshot_at(0)
        except BaseException:
            recording.close()
            raise
        #: What the TUI's status line names: the source that was recorded.
        self.name = first.source
        self._index = 0
        self._playing = False
        self._speed = 1.0
        self._anchor_wall = 0.0  # while playing: wall time when recorded time was _anchor_time
        self._anchor_time = self._times[0]
        # events()/new_messages() hand out what lies after these (at first: all up to the cursor).
        self._events_mark = self._messages_mark = float("-inf")
        self._event_keys: frozenset[EventKey] | None = None

    # --- the cursor ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._times)

    @property
    def index(self) -> int:
        return self._index

    @property
    def time(self) -> float:
        """The recorded time (s since the epoch) of the snapshot at the cursor."""
        return self._times[self._index]

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def speed(self) -> float:
        return self._speed

    def anomaly_indices(self) -> list[int]:
        """Snapshot indices at which a new anomaly appeared, ascending."""
        return list(self._anomalies)

    def cursor(self) -> Cursor:
        """The cursor now (playback is advanced by :meth:`tick`, not here)."""
        with self._lock:
            i = self._index
            seen = bisect.bisect_right(self._anomalies, i)
            return Cursor(index=i, count=len(self._times), time=self._times[i], start=self._times[0],
                          end=self._times[-1], playing=self._playing, speed=self._speed,
                          anomaly=seen > 0 and self._anomalies[seen - 1] == i,
                          anomalies_seen=seen, anomalies=len(self._anomalies))

    def _position(self, now: float) -> float:
        """The recorded time playback has reached at wall time ``now``."""
        if not self._playing:
            return self._times[self._index]
        return self._anchor_time + (now - self._anchor_wall) * self._speed

    def _anchor(self, recorded: float) -> None:
        self._anchor_time, self._anchor_wall = recorded, self._clock()

    def _advance(self) -> None:
        if self._playing:
            i = bisect.bisect_right(self._times, self._position(self._clock())) - 1
            self._index = max(self._index, i)
            if self._index == len(self._times) - 1:
                self._playing = False

    def tick(self) -> Cursor:
        """Advance a playing cursor to the last snapshot whose time playback
        has reached; playback pauses on the last snapshot. Returns the cursor."""
        with self._lock:
            self._advance()
            return self.cursor()

    def play(self) -> Cursor:
        """Start playback from the cursor (from the first snapshot when the
        cursor is on the last one)."""
        with self._lock:
            if self._index == len(self._times) - 1:
                self._index = 0
            self._playing = len(self._times) > 1
            self._anchor(self._times[self._index])
            return self.cursor()

    def pause(self) -> Cursor:
        """Stop playback where it has got to."""
        with self._lock:
            self._advance()
            self._playing = False
            return self.cursor()

    def toggle(self) -> Cursor:
        """Pause when playing, else play."""
        with self._lock:
            return self.pause() if self._playing else self.play()

    def seek(self, index: int) -> Cursor:
        """Put the cursor on snapshot ``index`` (0-based; clamped to the
        recording). Playback, if on, goes on from there."""
        with self._lock:
            self._index = max(0, min(index, len(self._times) - 1))
            self._anchor(self._times[self._index])
            if self._index == len(self._times) - 1:
                self._playing = False
            return self.cursor()

    def seek_time(self, t: float) -> Cursor:
        """Put the cursor on the last snapshot at or before ``t`` (s since the
        epoch; the first snapshot when ``t`` precedes it)."""
        with self._lock:
            return self.seek(max(0, bisect.bisect_right(self._times, t) - 1))

    def step(self, delta: int) -> Cursor:
        """Pause, and move ``delta`` snapshots (−1: back one, +1: forward one)."""
        with self._lock:
            self.pause()
            return self.seek(self._index + delta)

    def to_start(self) -> Cursor:
        return self.seek(0)

    def to_end(self) -> Cursor:
        return self.seek(len(self._times) - 1)

    def next_anomaly(self) -> Cursor | None:
        """Seek to the next snapshot after the cursor at which a new anomaly
        appeared; None (cursor unmoved) when there is none."""
        with self._lock:
            self._advance()
            k = bisect.bisect_right(self._anomalies, self._index)
            return self.seek(self._anomalies[k]) if k < len(self._anomalies) else None

    def prev_anomaly(self) -> Cursor | None:
        """Seek to the last such snapshot before the cursor; None when there is none."""
        with self._lock:
            self._advance()
            k = bisect.bisect_left(self._anomalies, self._index)
            return self.seek(self._anomalies[k - 1]) if k > 0 else None

    def set_speed(self, speed: float) -> Cursor:
        """Play at ``speed`` recorded seconds per wall second (> 0), from
        where playback has got to."""
        if not speed > 0:
            raise InspectorError(f"replay speed must be more than 0, got {speed}")
        with self._lock:
            if self._playing:
                self._anchor(self._position(self._clock()))
            self._speed = speed
            return self.cursor()

    def faster(self) -> Cursor:
        """The next speed of :data:`SPEEDS` above the current one (the fastest stays)."""
        with self._lock:
            k = bisect.bisect_right(SPEEDS, self._speed)
            return self.set_speed(SPEEDS[min(k, len(SPEEDS) - 1)])

    def slower(self) -> Cursor:
        """The next speed of :data:`SPEEDS` below the current one (the slowest stays)."""
        with self._lock:
            k = bisect.bisect_left(SPEEDS, self._speed)
            return self.set_speed(SPEEDS[max(k - 1, 0)])

    def seek_spec(self, spec: str) -> Cursor:
        """Seek as ``--at`` says: ``N`` the N-th snapshot as people count them
        (1 = the first; negative from the end, −1 = the last); ``+S`` S seconds
        after the first snapshot; a time (s since the epoch, or ISO 8601
        ``2025-11-21T08:25:01.250``, UTC unless it names a zone): the last
        snapshot at or before it. Raises SourceError on anything else or on
        an index outside the recording."""
        spec = spec.strip()
        n = len(self._times)
        if re.fullmatch(r"-?\d+", spec) and abs(int(spec)) < 10**9:
            k = int(spec)
            if not (1 <= k <= n or -n <= k <= -1):
                raise SourceError(f"--at {spec}: recording {self.path} has snapshots 1..{n} (or -{n}..-1)")
            return self.seek(k - 1 if k > 0 else n + k)
        try:
            if spec.startswith("+"):
                return self.seek_time(self._times[0] + float(spec[1:]))
            try:
                return self.seek_time(float(spec))
            except ValueError:
                t = datetime.fromisoformat(spec)
                if t.tzinfo is None:
                    t = t.replace(tzinfo=timezone.utc)
                return self.seek_time(t.timestamp())
        except ValueError:
            raise SourceError(f"--at {spec!r}: give a snapshot number (1..{n}, -1 = last), +SECONDS from the "
                              f"start, or a time (seconds since the epoch or ISO 8601, UTC)") from None

    # --- data at the cursor -------------------------------------------------

    def _snapshot_at(self, i: int) -> Snapshot:
        """Snapshot ``i`` from a small cache (the cursor's and its previous
        one are asked for on every frame). Call with ``_read_lock`` held."""
        snap = self._cache.get(i)
        if snap is None:
            try:
                snap = from_json(self._rec.snapshot(i))
            except SnapshotFormatError as e:
                raise SourceError(f"recording {self.path}: snapshot {i + 1}: {e}") from None
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = snap
        return snap

    def snapshot(self) -> Snapshot:
        """The recorded snapshot at the cursor, exactly as recorded (the same
        Snapshot on every call until the cursor moves: do not modify it)."""
        i = self.index
        with self._read_lock:
            return self._snapshot_at(i)

    def event_keys(self) -> frozenset[EventKey]:
        """Every ``(device, queue, kind)`` the recording holds any event of
        (one pass over its event totals, on the first call)."""
        with self._read_lock:
            if self._event_keys is None:
                self._event_keys = frozenset(k for k, c in self._rec.event_counts().items() if c)
            return self._event_keys

    @property
    def recording(self) -> Recording:
        """The open reader. Its methods are not serialised with this
        source's (the TUI's poll worker reads through them): use it from
        the thread that drives this source, or when nothing else does."""
        return self._rec

    def verdict_changes(self, thresholds: Thresholds | None = None) -> list[Diagnosis]:
        """Every verdict change of the recording, in time order (the first
        diagnosis of each queue included): the recorder's, or for a file
        without them computed from its snapshots and events; ``thresholds``
        given: computed with those (``Recording.verdict_changes``, which
        keeps the first kind: for a file without them the first call runs
        the Analyzer over the whole recording). Independent of the cursor;
        seek to a change with :meth:`seek_time` (``Diagnosis.time``)."""
        with self._read_lock:
            return self._rec.verdict_changes(thresholds)

    def frame(self) -> ReplayFrame:
        """The cursor, its snapshot, the one before it, and the recorded
        event counts of the interval between the two (see ReplayFrame)."""
        cur = self.cursor()
        i = cur.index
        with self._read_lock:
            if i == 0:  # no interval, no rates: the event totals are not needed yet
                return ReplayFrame(cur, self._snapshot_at(0), None, {}, frozenset())
            # Events in (previous time, cursor time]; the reader's bounds are
            # start <= t < end, so shift both by one ns.
            counts = self._rec.event_counts(to_ns(self._times[i - 1]) + 1, to_ns(cur.time) + 1)
            return ReplayFrame(cur, self._snapshot_at(i), self._snapshot_at(i - 1), dict(counts), self.event_keys())

    def events(self) -> list[Event]:
        """The recorded events after the cursor time of the previous call (at
        the first call: from the beginning) up to and including the cursor's
        time, oldest first: what happened while playback moved forward. Empty
        when the cursor did not move forward (moving back hands out nothing)."""
        span = self._hand_out_to_cursor("_events_mark")
        if span is None:
            return []
        start, end = span
        with self._read_lock:
            return list(self._rec.events(None if start == float("-inf") else to_ns(start) + 1, to_ns(end) + 1))

    def new_messages(self) -> list[dict]:
        """The recorded vhost-user messages after the cursor time of the
        previous call (at the first: from the beginning, the handshake) up to
        the cursor's, oldest first (like events())."""
        span = self._hand_out_to_cursor("_messages_mark")
        if span is None:
            return []
        start, end = span
        with self._read_lock:
            return [m for m in self._rec.messages(until=end) if m.get("time", end) > start]

    def _hand_out_to_cursor(self, mark: str) -> tuple[float, float] | None:
        """Move the mark ``mark`` (an attribute: the recorded time handed
        out up to) to the cursor's time; the span ``(old mark, cursor time]``
        to hand out, or None when the cursor did not move forward."""
        with self._lock:
            start, end = getattr(self, mark), self._times[self._index]
            setattr(self, mark, end)
        return None if end <= start else (start, end)

    def close(self) -> None:
        with self._read_lock:
            self._rec.close()
