"""The recording file's SQLite schema (README.md, "Recording").

One file is one recording (or one part of a rotated recording). Every table
is plain SQL so that ``sqlite3 FILE`` can query it; only two columns hold
packed data: ``snapshots.data`` (zlib-compressed JSON, a keyframe or the
changes from the previous snapshot, see :mod:`inspector.recording.codec`) and
``event_blocks.data`` (zlib-compressed packed event columns). Their counts,
times and per-kind totals are plain columns.

Bump :data:`SCHEMA_VERSION` on any change a reader of the previous version
would misread; the reader refuses versions it does not know.

Versions:

1. header, snapshots, queue_samples, event_kinds, event_blocks, messages,
   anomalies.
2. adds ``verdicts``: each queue's verdict (inspector.analysis) when it
   changed, as the recorder's Analyzer gave it, and ``header.analyzer`` (its
   options) when that table holds them. A reader computes the verdicts of a
   version-1 file (or of one without ``header.analyzer``) from its snapshots
   and events (reader.py, ``Recording.verdict_changes``).
"""

from __future__ import annotations

#: ``header.format`` of every vqscope recording.
FORMAT = "vqscope-recording"

#: ``header.schema_version`` of the files this vqscope writes.
SCHEMA_VERSION = 2

#: The versions the reader reads; it refuses any other value.
READABLE_VERSIONS = (1, 2)

DDL = """
CREATE TABLE header (
    key   TEXT PRIMARY KEY,      -- format, schema_version, vqscope_version, kernel, hostname, ...
    value TEXT NOT NULL          -- JSON
);
CREATE TABLE snapshots (
    idx         INTEGER PRIMARY KEY,   -- 0, 1, 2 ... in recording order
    time        REAL NOT NULL,         -- the snapshot's "time" (s since the epoch), as the source gave it
    keyframe    INTEGER NOT NULL,      -- 1: data is the whole snapshot; 0: changes from idx-1
    events_lost INTEGER NOT NULL,      -- the source's cumulative lost-event count at this snapshot
    data        BLOB NOT NULL          -- zlib(JSON): {"k": snapshot} or a delta (codec.py)
);
CREATE TABLE queue_samples (            -- per queue, at each snapshot where one of these changed
    snap           INTEGER NOT NULL,    -- snapshots.idx
    device         TEXT NOT NULL,
    queue          INTEGER NOT NULL,    -- vring index
    avail_idx      INTEGER,
    used_idx       INTEGER,
    last_avail_idx INTEGER,
    inflight       INTEGER,
    kicks          INTEGER,
    calls          INTEGER,
    PRIMARY KEY (snap, device, queue)
) WITHOUT ROWID;
CREATE TABLE event_kinds (
    id   INTEGER PRIMARY KEY,           -- the byte stored per event in event_blocks.data
    kind TEXT NOT NULL UNIQUE           -- inspector.events.KINDS (kick, call, handler_start ...)
);
CREATE TABLE event_blocks (              -- the events of one (device, queue) drained in one interval
    id          INTEGER PRIMARY KEY,
    device      TEXT NOT NULL,
    queue       INTEGER NOT NULL,       -- -1: not tied to one queue
    t_first     INTEGER NOT NULL,       -- ns since the epoch, earliest event in the block
    t_last      INTEGER NOT NULL,       -- ns since the epoch, latest event in the block
    count       INTEGER NOT NULL,       -- events in the block
    kicks       INTEGER NOT NULL,       -- of which kind "kick"
    calls       INTEGER NOT NULL,       -- of which kind "call"
    kind_counts TEXT NOT NULL,          -- JSON {kind: count} for every kind in the block
    data        BLOB NOT NULL           -- zlib(time deltas | kind ids | values), codec.py
);
CREATE INDEX event_blocks_time ON event_blocks (t_first);
CREATE TABLE messages (                  -- vhost-user messages the back-end logged
    id         INTEGER PRIMARY KEY,
    time       REAL NOT NULL,           -- s since the epoch, when the back-end read it
    connection INTEGER,                 -- the back-end's connection id
    request    TEXT,                    -- VHOST_USER_* name without the prefix (GET_FEATURES ...)
    flags      INTEGER,
    size       INTEGER,                 -- payload bytes
    nfds       INTEGER,                 -- fds passed with it (SCM_RIGHTS)
    fields     TEXT,                    -- JSON: the decoded payload fields
    entry      TEXT NOT NULL            -- JSON: the log entry exactly as the source gave it
);
CREATE INDEX messages_time ON messages (time);
CREATE TABLE anomalies (                 -- each anomaly once, at the snapshot where it appeared
    id     INTEGER PRIMARY KEY,
    snap   INTEGER NOT NULL,            -- snapshots.idx
    time   REAL NOT NULL,               -- that snapshot's time
    device TEXT NOT NULL,
    queue  INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX anomalies_snap ON anomalies (snap);
CREATE TABLE verdicts (                  -- a queue's verdict each time it changed (version 2)
    id       INTEGER PRIMARY KEY,
    snap     INTEGER NOT NULL,          -- snapshots.idx of the snapshot the verdict was made at
    time     REAL NOT NULL,             -- that snapshot's time (s since the epoch)
    device   TEXT NOT NULL,
    queue    INTEGER NOT NULL,          -- vring index
    verdict  TEXT NOT NULL,             -- healthy, idle, device_stalled ... (inspector.analysis.Verdict)
    since    REAL NOT NULL,             -- when the verdict began to hold (s since the epoch)
    evidence TEXT NOT NULL,             -- the numbers and the rule that fired, one sentence ('' when healthy)
    role     TEXT NOT NULL              -- fill, consume or unknown (inspector.analysis.roles)
);
CREATE INDEX verdicts_time ON verdicts (time);
"""
