"""Read a recording file (schema.py): snapshots, events, messages, anomalies,
verdict changes.

The replay source (``vqscope tui --replay``) and the exporter are built on
:class:`Recording`; so can any script::

    with Recording("run.vqs") as rec:
        for i in rec.anomaly_indices():
            print(rec.snapshot_times()[i], rec.snapshot(i)["queues"][0]["avail_idx"])
        print(rec.event_counts())
        for d in rec.verdict_changes():
            print(d.time, d.device, d.index, d.verdict, d.evidence)
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import urllib.parse
from functools import partial
from itertools import repeat
from operator import gt, itemgetter
from typing import Any, Iterator

from ..analysis import Diagnosis, Thresholds, diagnosis_from_json, verdict_timeline
from ..errors import InspectorError, SnapshotFormatError
from ..events import Event
from ..snapshot.codec import from_json
from ..snapshot.model import Snapshot
from . import codec
from .schema import FORMAT, READABLE_VERSIONS

_new_event = partial(tuple.__new__, Event)


def to_ns(t: float) -> int:
    """Seconds since the epoch (a snapshot's ``time``) to integer ns (an Event's ``time_ns``)."""
    return round(t * 1e9)


class RecordingError(InspectorError):
    """A file that is not a readable vqscope recording (missing, not SQLite,
    not ours, another schema version, empty, or damaged data): names the
    file and what is wrong with it.

    The reading side's error; :class:`inspector.record.writer.RecordError`
    is the writing side's (a recording that cannot be made). Replay
    (``vqscope tui|snapshot --replay``), export and scripts reading a file
    catch this one; nothing that reads raises RecordError."""


class Recording:
    """A recording opened read-only (SQLite URI ``mode=ro``).

    ``path``: the file; ``header``: the header table, values decoded from
    JSON (``format``, ``schema_version``, ``vqscope_version``, ``kernel``,
    ``hostname``, ``source``, ``source_kind``, ``interval_ms``,
    ``start_time``, ``queues``, ``analyzer`` ...); ``schema_version``: the
    file's (schema.READABLE_VERSIONS). Snapshot indices run from 0 to
    ``len(rec) - 1``; event times are ns since the epoch; snapshot and
    message times are seconds since the epoch (floats).

    Raises RecordingError when the file is missing, not an SQLite database,
    not a vqscope recording, of an unknown schema version, or holds no
    snapshot.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise RecordingError(f"{path}: no such file")
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            raise RecordingError(f"{path}: cannot open: {e}") from e
        try:
            self.header = self._read_header()
            n = self._db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
            self._kinds = dict(self._db.execute("SELECT id, kind FROM event_kinds"))
        except sqlite3.DatabaseError as e:
            self.close()
            raise RecordingError(f"{path}: not a vqscope recording ({e})") from e
        except BaseException:
            self.close()
            raise
        if n == 0:
            self.close()
            raise RecordingError(f"{path}: empty recording (no snapshot was committed; was the recorder "
                                 f"stopped before its first interval?)")
        self._cache: tuple[int, dict] | None = None
        self._verdicts: list[Diagnosis] | None = None

    def _read_header(self) -> dict[str, Any]:
        try:
            rows = self._db.execute("SELECT key, value FROM header").fetchall()
        except sqlite3.DatabaseError as e:
            raise RecordingError(f"{self.path}: not a vqscope recording ({e})") from e
        header = {}
        for k, v in rows:
            try:
                header[k] = json.loads(v)
            except (TypeError, ValueError, RecursionError):
                header[k] = v
        if header.get("format") != FORMAT:
            raise RecordingError(f"{self.path}: not a vqscope recording (header format is "
                                 f"{header.get('format')!r}, expected {FORMAT!r})")
        version = header.get("schema_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise RecordingError(f"{self.path}: unknown schema version {version!r} (this vqscope reads "
                                 f"versions {', '.join(map(str, READABLE_VERSIONS))}); use the vqscope that "
                                 f"recorded it")
        self.schema_version = version
        return header

    # ------------------------------------------------------------- snapshots
    def __len__(self) -> int:
        """Number of snapshots."""
        return self._db.execute("SELECT count(*) FROM snapshots").fetchone()[0]

    def snapshot_times(self) -> list[float]:
        """Each snapshot's ``time`` (s since the epoch), by index (ascending
        as the source gave them)."""
        return [t for (t,) in self._db.execute("SELECT time FROM snapshots ORDER BY idx")]

    def _rows(self, start: int, stop: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        q = "SELECT idx, keyframe, data FROM snapshots WHERE idx >= ?"
        args: list[int] = [start]
        if stop is not None:
            q += " AND idx <= ?"
            args.append(stop)
        return iter(self._db.execute(q + " ORDER BY idx", args))

    @staticmethod
    def _step(prev: dict | None, keyframe: int, data: bytes) -> dict:
        obj = codec.unpack_snapshot(data)
        if keyframe:
            return obj["k"]
        if prev is None:
            raise codec.CodecError("a delta without a preceding keyframe")
        return codec.apply_delta(prev, obj)

    def snapshot(self, i: int) -> dict:
        """Snapshot ``i`` (negative counts from the end), equal to the dict
        the source returned (as JSON). Decodes from the nearest keyframe, or
        on from the last snapshot asked for: stepping forward is O(1).
        Treat the result as read-only (it shares parts with its neighbours)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: snapshot {i} out of range (0..{n - 1})")
        key = self._db.execute("SELECT max(idx) FROM snapshots WHERE keyframe = 1 AND idx <= ?",
                               (i,)).fetchone()[0]
        if key is None:
            raise RecordingError(f"{self.path}: snapshot {i} has no keyframe before it")
        if self._cache is not None and key <= self._cache[0] <= i:
            start, snap = self._cache
            start += 1
        else:
            start, snap = key, None
        try:
            for idx, kf, data in self._rows(start, i):
                snap = self._step(snap, kf, data)
        except codec.CodecError as e:
            raise RecordingError(f"{self.path}: snapshot {i}: {e}") from e
        self._cache = (i, snap)
        return snap

    def snapshots(self) -> Iterator[dict]:
        """Every snapshot in order (see :meth:`snapshot`)."""
        snap = None
        for idx, kf, data in self._rows(0):
            try:
                snap = self._step(snap, kf, data)
            except codec.CodecError as e:
                raise RecordingError(f"{self.path}: snapshot {idx}: {e}") from e
            yield snap

    # ------------------------------------------------------------- anomalies
    def anomaly_indices(self) -> list[int]:
        """Indices of the snapshots at which a new anomaly appeared, ascending."""
        return [i for (i,) in self._db.execute("SELECT DISTINCT snap FROM anomalies ORDER BY snap")]

    def anomalies(self) -> list[dict]:
        """Every anomaly once: ``{index, time, device, queue, kind, detail}``
        where ``index`` is the snapshot at which it appeared."""
        cur = self._db.execute("SELECT snap, time, device, queue, kind, detail FROM anomalies ORDER BY snap, id")
        return [dict(zip(("index", "time", "device", "queue", "kind", "detail"), r)) for r in cur]

    # ------------------------------------------------------------- events
    @staticmethod
    def _range_sql(start_ns: int | None, end_ns: int | None, inside: bool) -> tuple[str, list[int]]:
        """The condition on event_blocks (and its arguments) that a block
        overlaps ``[start_ns, end_ns)`` or, ``inside``, lies wholly in it
        ("1" when both bounds are open)."""
        cond, args = [], []
        if start_ns is not None:
            cond.append("t_first >= ?" if inside else "t_last >= ?")
            args.append(start_ns)
        if end_ns is not None:
            cond.append("t_last < ?" if inside else "t_first < ?")
            args.append(end_ns)
        return " AND ".join(cond) or "1", args

    def _blocks(self, start_ns: int | None, end_ns: int | None, cols: str):
        cond, args = self._range_sql(start_ns, end_ns, inside=False)
        return self._db.execute(f"SELECT {cols} FROM event_blocks WHERE {cond} ORDER BY t_first, id", args)

    def _decode_block(self, device: str, queue: int, count: int, data: bytes,
                      start_ns: int | None, end_ns: int | None, inside: bool) -> list[Event]:
        try:
            times, kinds, values = codec.decode_events(data, count)
            evs = list(map(_new_event, zip(times, repeat(device), repeat(queue),
                                           map(self._kinds.__getitem__, kinds), values)))
        except (codec.CodecError, KeyError) as e:
            raise RecordingError(f"{self.path}: event block of {device} queue {queue}: {e}") from e
        if any(map(gt, times[:-1], times[1:])):
            evs.sort(key=itemgetter(0))
        if not inside:
            lo = start_ns if start_ns is not None else -(1 << 63)
            hi = end_ns if end_ns is not None else 1 << 63
            evs = [e for e in evs if lo <= e[0] < hi]
        return evs

    def _inside(self, t_first: int, t_last: int, start_ns, end_ns) -> bool:
        return (start_ns is None or t_first >= start_ns) and (end_ns is None or t_last < end_ns)

    def events(self, start_ns: int | None = None, end_ns: int | None = None) -> Iterator[Event]:
        """Events with ``start_ns <= time_ns < end_ns`` (either bound None:
        open), in time order (equal times: recording order). Decodes only
        the blocks that overlap the range, a few at a time."""
        rows = self._blocks(start_ns, end_ns, "device, queue, t_first, t_last, count, data")
        heap: list = []
        seq = 0
        pending = next(rows, None)
        while heap or pending is not None:
            # A block can hold an event before the heap's head only if it
            # starts before it: blocks come ordered by t_first.
            while pending is not None and (not heap or pending[2] <= heap[0][0]):
                device, queue, t_first, t_last, count, data = pending
                evs = self._decode_block(device, queue, count, data, start_ns, end_ns,
                                         self._inside(t_first, t_last, start_ns, end_ns))
                if evs:
                    it = iter(evs)
                    e = next(it)
                    heapq.heappush(heap, (e[0], seq, e, it))
                    seq += 1
                pending = next(rows, None)
            if not heap:
                continue
            _, s, e, it = heap[0]
            yield e
            nxt = next(it, None)
            if nxt is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (nxt[0], s, nxt, it))

    def event_counts(self, start_ns: int | None = None, end_ns: int | None = None) -> dict[tuple[str, int, str], int]:
        """``{(device, queue, kind): count}`` of the events in
        ``[start_ns, end_ns)``; blocks wholly inside the range are summed by
        SQLite from their ``kind_counts`` column (no block is read or
        decoded), only the few that straddle a bound are decoded."""
        inside, args = self._range_sql(start_ns, end_ns, inside=True)
        out: dict[tuple[str, int, str], int] = {}
        try:
            rows = self._db.execute(
                "SELECT device, queue, j.key, sum(j.value) FROM event_blocks, json_each(kind_counts) AS j"
                f" WHERE {inside} GROUP BY device, queue, j.key", args).fetchall()
        except sqlite3.Error as e:   # a kind_counts that is not JSON
            raise RecordingError(f"{self.path}: event_blocks.kind_counts: {e}") from e
        for device, queue, kind, n in rows:
            if not isinstance(n, int):
                raise RecordingError(f"{self.path}: event_blocks.kind_counts of {device} queue {queue}: "
                                     f"count {n!r} of {kind!r} is not an integer")
            if n:
                out[device, queue, kind] = n
        if start_ns is not None or end_ns is not None:   # blocks overlapping the range, not inside it
            overlap, oargs = self._range_sql(start_ns, end_ns, inside=False)
            for device, queue, count, data in self._db.execute(
                    f"SELECT device, queue, count, data FROM event_blocks WHERE {overlap}"
                    f" AND NOT ({inside})", oargs + args):
                for e in self._decode_block(device, queue, count, data, start_ns, end_ns, False):
                    k = (device, queue, e[3])
                    out[k] = out.get(k, 0) + 1
        return out

    def time_bounds(self) -> tuple[float, float]:
        """``(first, last)``: the earliest and latest time (s since the
        epoch) of any snapshot, event or message in the recording (messages
        logged before the recording started included)."""
        lo, hi = self._db.execute("SELECT min(time), max(time) FROM snapshots").fetchone()
        elo, ehi = self._db.execute("SELECT min(t_first), max(t_last) FROM event_blocks").fetchone()
        mlo, mhi = self._db.execute("SELECT min(time), max(time) FROM messages").fetchone()
        lows = [t for t in (lo, elo / 1e9 if elo is not None else None, mlo) if t is not None]
        highs = [t for t in (hi, ehi / 1e9 if ehi is not None else None, mhi) if t is not None]
        return min(lows), max(highs)

    # ------------------------------------------------------------- verdicts
    def frames(self) -> Iterator[tuple[Snapshot, list[Event]]]:
        """Every snapshot as a typed Snapshot, in order, with the recorded
        events since the one before: ``time_ns`` in ``(previous time, this
        time]`` (ns; the first snapshot gets every event up to its time; events
        after the last snapshot are in no frame). What an Analyzer is fed
        (``inspector.analysis.verdict_timeline``). The recorder fed its
        Analyzer each snapshot with the events drained in the same interval,
        which may include events of the few ms between reading the snapshot
        and draining; here every event goes with the first snapshot taken at
        or after it. RecordingError for a snapshot that is not Snapshot JSON."""
        events = self.events()
        pending = next(events, None)
        for i, snap in enumerate(self.snapshots()):
            try:
                typed = from_json(snap)
            except SnapshotFormatError as e:
                raise RecordingError(f"{self.path}: snapshot {i}: {e}") from None
            bound = to_ns(typed.time)
            batch = []
            while pending is not None and pending[0] <= bound:
                batch.append(pending)
                pending = next(events, None)
            yield typed, batch

    def verdict_changes(self, thresholds: Thresholds | None = None) -> list[Diagnosis]:
        """Every change of a queue's verdict over the recording, in time
        order (equal times: queue order), the first diagnosis of each queue
        included (inspector.analysis.Diagnosis).

        From the ``verdicts`` table when the recorder's Analyzer wrote it
        (``header.analyzer`` set: schema version 2); else (a version-1 file,
        or one written without an Analyzer) computed by
        ``inspector.analysis.verdict_timeline`` over :meth:`frames` with the
        default thresholds and ``notifications_seen`` = ``header.has_events``,
        as the recorder would have done, once per Recording. ``thresholds``
        given: always computed, with those. RecordingError for a table row
        that is not a diagnosis (naming its id and the field)."""
        analyzer = self.header.get("analyzer")
        if thresholds is None and self._verdicts is not None:
            return list(self._verdicts)
        if thresholds is None and isinstance(analyzer, dict):
            out = self._verdict_rows()
        else:
            seen = analyzer.get("notifications_seen") if isinstance(analyzer, dict) else None
            if not isinstance(seen, bool):
                seen = self.header.get("has_events") is True
            out = verdict_timeline(self.frames(), thresholds or Thresholds(), seen)
        if thresholds is None:
            self._verdicts = out
        return list(out)

    def _verdict_rows(self) -> list[Diagnosis]:
        out = []
        try:
            rows = self._db.execute("SELECT id, time, device, queue, verdict, since, evidence, role FROM verdicts "
                                    "ORDER BY time, id").fetchall()
        except sqlite3.DatabaseError as e:
            raise RecordingError(f"{self.path}: verdicts: {e}") from e
        for id_, time, device, queue, verdict, since, evidence, role in rows:
            obj = {"time": time, "device": device, "index": queue, "verdict": verdict, "since": since,
                   "evidence": evidence, "role": role}
            try:
                out.append(diagnosis_from_json(obj, f"verdicts row {id_}"))
            except SnapshotFormatError as e:
                raise RecordingError(f"{self.path}: {e}") from None
        return out

    # ------------------------------------------------------------- messages
    def iter_messages(self, until: float | None = None) -> Iterator[dict]:
        """The vhost-user message log entries, as the source gave them, in
        time order, up to ``until`` (s since the epoch, inclusive)."""
        q = "SELECT entry FROM messages"
        args: tuple = ()
        if until is not None:
            q += " WHERE time <= ?"
            args = (until,)
        for (entry,) in self._db.execute(q + " ORDER BY time, id", args):
            try:
                yield json.loads(entry)
            except (TypeError, ValueError, RecursionError) as e:
                raise RecordingError(f"{self.path}: a messages entry is not JSON: "
                                     f"{type(e).__name__}: {e}"[:300]) from None

    def messages(self, until: float | None = None) -> list[dict]:
        """:meth:`iter_messages` as a list."""
        return list(self.iter_messages(until))

    # ------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
