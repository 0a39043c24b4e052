"""Write a recording file (schema.py): one SQLite transaction per interval.

The writer keeps only what the next interval needs — the previous snapshot
(for its delta), the anomalies active in it, the event-kind ids — so its
memory stays flat however long it records. It stores the verdict changes it
is given (the recorder's Analyzer makes them, recorder.py); it judges
nothing itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from typing import Any, Iterable, Sequence

from ..analysis import Diagnosis
from ..errors import InspectorError
from ..recording import codec
from ..recording.schema import DDL, FORMAT, SCHEMA_VERSION

#: A keyframe (whole snapshot) every this many snapshots: random access
#: decodes at most this many deltas.
KEYFRAME_EVERY = 64

_SAMPLE_FIELDS = ("avail_idx", "used_idx", "last_avail_idx", "inflight", "kicks", "calls")
#: What else makes a new ``queue_samples`` row: a packed queue's positions
#: (§2.8; its ``avail_idx``/``used_idx`` are null), so that its rows follow
#: the ring as a split queue's do. Not columns: the snapshot holds them.
_PACKED_MOVES = ("next_avail", "avail_wrap_counter", "next_used", "used_wrap_counter")
_N_SAMPLE = len(_SAMPLE_FIELDS)


class RecordError(InspectorError):
    """Making a recording failed or cannot start: the file exists, SQLite
    refused a write, an event does not fit the format, the disk is full
    (:class:`DiskFullError`), or ``vqscope record`` was given arguments that
    make no recording.

    The writing side's error; :class:`inspector.recording.reader.RecordingError`
    is the reading side's (a file that is not a readable recording). Two
    names because they reach different callers: the recorder stops on this
    one and keeps the file readable up to its last interval, while replay,
    export and scripts get that one about a file someone gave them."""


class DiskFullError(RecordError):
    """The file system holding the recording is full (SQLITE_FULL, ENOSPC)."""


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
        return True
    if isinstance(e, sqlite3.Error):
        name = getattr(e, "sqlite_errorname", "") or ""
        return name.startswith("SQLITE_FULL") or "disk is full" in str(e)
    return False


def file_size(path: str) -> int:
    """Bytes on disk of a recording: the database plus its WAL."""
    total = 0
    for p in (path, path + "-wal"):
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _queue_sample(q: dict) -> tuple:
    if q.get("layout") == "packed":
        return tuple(q.get(f) for f in _SAMPLE_FIELDS + _PACKED_MOVES)
    return tuple(q.get(f) for f in _SAMPLE_FIELDS)


class RecordingWriter:
    """Writes one recording file.

    ``path``: a new file (an existing one is refused: RecordError).
    ``header``: JSON-able values stored in the ``header`` table besides
    ``format`` and ``schema_version``; the per-queue layout (``queues``) is
    added from the first snapshot. Call :meth:`write_interval` once per
    interval, then :meth:`close`. A full disk raises DiskFullError after
    rolling the interval back: everything committed before stays readable.
    """

    def __init__(self, path: str, header: dict[str, Any], keyframe_every: int = KEYFRAME_EVERY):
        if os.path.exists(path):
            raise RecordError(f"{path} exists: give a new file name (a recording is never appended to)")
        self.path = path
        self.keyframe_every = keyframe_every
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise RecordError(f"cannot create {path}: {e}") from e
        self.snapshots = 0
        self.events = 0
        self.messages = 0
        self.anomalies = 0
        self.verdicts = 0
        self.events_lost = 0
        self._prev: dict | None = None
        self._prev_samples: dict[tuple, tuple] = {}
        self._active: set[tuple] = set()
        self._kind_ids: dict[str, int] = {}
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit is durable against a process crash (the WAL is
            # written before COMMIT returns), not against power loss.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript("BEGIN;\n" + DDL)  # the transaction stays open for the header
            rows = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **header}
            self.db.executemany("INSERT INTO header (key, value) VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in rows.items()])
            self.db.execute("COMMIT")
        except BaseException as e:
            self._abort()
            if _is_disk_full(e):
                raise DiskFullError(f"disk full creating {path}") from e
            raise

    # ---------------------------------------------------------------- writing
    def set_header(self, key: str, value: Any) -> None:
        """Set one header value (its own transaction)."""
        self._tx(lambda: self.db.execute("INSERT OR REPLACE INTO header (key, value) VALUES (?, ?)",
                                         (key, json.dumps(value))))

    def write_interval(self, snapshot: dict | None, events: Sequence = (), messages: Iterable[dict] = (),
                       events_lost: int | None = None, verdicts: Sequence[Diagnosis] = ()) -> None:
        """Store one interval in one transaction: ``snapshot`` (a snapshot
        JSON dict, or None), ``events`` (inspector.events.Event tuples),
        ``messages`` (vhost-user message log entries), the source's
        cumulative ``events_lost``, and ``verdicts``: the Diagnoses made at
        this snapshot (one ``verdicts`` row each; RecordError when there is
        no snapshot to tie them to). Nothing is kept from ``events``,
        ``messages`` or ``verdicts`` after it returns."""
        if verdicts and snapshot is None:
            raise RecordError("verdicts are made at a snapshot: write_interval was given verdicts without one")
        if events_lost is not None:
            self.events_lost = events_lost
        state = (self._prev, self._prev_samples, self._active, self.snapshots, self.anomalies,
                 dict(self._kind_ids), self.events, self.messages, self.verdicts)

        def body() -> None:
            if snapshot is not None:
                self._write_snapshot(snapshot)
            if events:
                self._write_events(events)
            self._write_messages(messages)
            if verdicts:
                self._write_verdicts(verdicts)

        def restore() -> None:  # our state back to the last commit, like the file
            (self._prev, self._prev_samples, self._active, self.snapshots, self.anomalies,
             self._kind_ids, self.events, self.messages, self.verdicts) = state

        self._tx(body, restore)

    def _write_snapshot(self, snap: dict) -> None:
        idx = self.snapshots
        if self._prev is None:
            self._header_from(snap)
        keyframe = self._prev is None or idx % self.keyframe_every == 0
        obj = {"k": snap} if keyframe else codec.encode_delta(self._prev, snap)
        t = snap.get("time")
        self.db.execute("INSERT INTO snapshots (idx, time, keyframe, events_lost, data) VALUES (?, ?, ?, ?, ?)",
                        (idx, t if isinstance(t, (int, float)) else 0.0, int(keyframe), self.events_lost,
                         codec.pack_snapshot(obj)))
        queues = snap.get("queues")
        samples, active, rows, new_anoms = {}, set(), [], []
        for q in queues if isinstance(queues, list) else ():
            if not isinstance(q, dict):
                continue
            key = (str(q.get("device")), q.get("index") if isinstance(q.get("index"), int) else -1)
            s = _queue_sample(q)
            samples[key] = s
            if self._prev_samples.get(key) != s:
                rows.append((idx, *key, *(v if isinstance(v, int) else None for v in s[:_N_SAMPLE])))
            for a in q.get("anomalies") or ():
                kind = str(a.get("kind")) if isinstance(a, dict) else str(a)
                akey = (*key, kind)
                if akey not in active and akey not in self._active:
                    detail = a.get("detail", "") if isinstance(a, dict) else ""
                    new_anoms.append((idx, t if isinstance(t, (int, float)) else 0.0, *key, kind,
                                      detail if isinstance(detail, str) else json.dumps(detail)))
                active.add(akey)
        if rows:
            self.db.executemany("INSERT OR REPLACE INTO queue_samples (snap, device, queue, avail_idx, used_idx, "
                                "last_avail_idx, inflight, kicks, calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if new_anoms:
            self.db.executemany("INSERT INTO anomalies (snap, time, device, queue, kind, detail) "
                                "VALUES (?, ?, ?, ?, ?, ?)", new_anoms)
        self._prev, self._prev_samples, self._active = snap, samples, active
        self.snapshots = idx + 1
        self.anomalies += len(new_anoms)

    def _kind_id(self, kind: str) -> int:
        kid = self._kind_ids.get(kind)
        if kid is None:
            kid = len(self._kind_ids) + 1
            if kid > 255:
                raise RecordError(f"more than 255 event kinds (the 256th is {kind!r}); the event "
                                  f"block format stores a kind in one byte")
            self.db.execute("INSERT INTO event_kinds (id, kind) VALUES (?, ?)", (kid, kind))
            self._kind_ids[kind] = kid
        return kid

    def _write_events(self, events: Sequence) -> None:
        groups: defaultdict[tuple, list] = defaultdict(list)
        for e in events:
            groups[e[1], e[2]].append(e)
        ids = self._kind_ids
        rows = []
        for (device, queue), g in groups.items():
            times, _, _, kinds, values = zip(*g)
            try:
                kb = bytes(map(ids.__getitem__, kinds))
            except KeyError:
                for k in set(kinds):
                    self._kind_id(k)
                kb = bytes(map(ids.__getitem__, kinds))
            per_kind: dict[str, int] = {}
            for k in set(kinds):
                per_kind[k] = kinds.count(k)
            try:
                data = codec.encode_events(times, kb, values)
            except codec.CodecError as e:
                raise RecordError(f"event of {device} queue {queue}: {e}") from e
            rows.append((device, queue, min(times), max(times), len(g), per_kind.get("kick", 0),
                         per_kind.get("call", 0), json.dumps(per_kind, sort_keys=True), data))
        self.db.executemany("INSERT INTO event_blocks (device, queue, t_first, t_last, count, kicks, calls, "
                            "kind_counts, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self.events += len(events)

    def _write_messages(self, messages: Iterable[dict]) -> None:
        rows = []
        for m in messages:
            conn = m.get("connection", m.get("conn"))
            fields = m.get("fields")
            rows.append((m.get("time", 0.0), conn if isinstance(conn, int) else None, m.get("request"),
                         m.get("flags"), m.get("size"), m.get("nfds"),
                         None if fields is None else json.dumps(fields), json.dumps(m)))
        if rows:
            self.db.executemany("INSERT INTO messages (time, connection, request, flags, size, nfds, fields, "
                                "entry) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.messages += len(rows)

    def _write_verdicts(self, verdicts: Sequence[Diagnosis]) -> None:
        snap = self.snapshots - 1  # this interval's snapshot, written just before
        self.db.executemany("INSERT INTO verdicts (snap, time, device, queue, verdict, since, evidence, role) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(snap, d.time, d.device, d.index, d.verdict.value, d.since, d.evidence, d.role)
                             for d in verdicts])
        self.verdicts += len(verdicts)

    def _header_from(self, snap: dict) -> None:
        queues = []
        for q in snap.get("queues") or ():
            if isinstance(q, dict):
                queues.append({k: q.get(k) for k in ("device", "index", "layout", "size", "features",
                                                     "event_idx")})
        self.db.executemany("INSERT OR REPLACE INTO header (key, value) VALUES (?, ?)",
                            [("queues", json.dumps(queues)), ("first_snapshot_time", json.dumps(snap.get("time")))])

    def _tx(self, fn, on_rollback=None) -> None:
        """Run ``fn`` in one transaction; on any error roll back, call
        ``on_rollback`` and raise (DiskFullError on a full disk,
        RecordError on another SQLite error)."""
        try:
            self.db.execute("BEGIN")
            fn()
            self.db.execute("COMMIT")
        except BaseException as e:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if on_rollback is not None:
                on_rollback()
            if _is_disk_full(e):
                raise DiskFullError(f"disk full writing {self.path}: the recording stops; it holds "
                                    f"{self.snapshots} snapshots and {self.events} events") from e
            if isinstance(e, sqlite3.Error):
                raise RecordError(f"cannot write {self.path}: {e}") from e
            raise

    # ---------------------------------------------------------------- closing
    def size(self) -> int:
        """Bytes of the database as committed (page count × page size): what
        the file measures once its WAL is checkpointed. The WAL beside it
        adds at most about 4 MB (SQLite's auto-checkpoint at 1000 pages)."""
        if self.db is None:
            return file_size(self.path)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return pages * page_size

    def _abort(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        """Checkpoint the WAL into the database (best effort: on a full disk
        the WAL stays beside it, and SQLite reads both) and close."""
        if self.db is None:
            return
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._abort()
        self.db = None

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
