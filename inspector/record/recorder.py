"""``vqscope record``: poll a source every interval and store what it saw.

Each interval: one snapshot (stored as its Snapshot JSON, made here by
inspector.snapshot.codec), the events drained since the previous interval
(``source.events()``), the new vhost-user messages
(``source.new_messages()``), the source's lost-event count
(``source.events_lost()``) and the verdict changes of an
:class:`inspector.analysis.Analyzer` fed with that snapshot and those events
— written in one SQLite transaction (writer.py). So a SIGKILL loses at
most the interval being written; SIGINT/SIGTERM write a last interval and
close. Progress goes to stderr about once a second.

Verdicts: the Analyzer (``notifications_seen`` = ``source.has_events``, its
thresholds in ``header.analyzer``) sees every recorded snapshot with the
events drained in the same interval, and the changes it returns are stored
(``verdicts`` table). The first interval of each part (``--rotate``) stores
every queue's current verdict, so that each part's timeline is whole; its
``since`` keeps when the verdict began, maybe in an earlier part. Should the
Analyzer raise, the recording goes on without verdicts (said on stderr;
``header.analyzer`` is cleared, so readers compute them from the file).

Exit status: 0 when stopped by a signal, ``--duration`` or ``--max-size``
(without ``--rotate``); 1 when the source went away or the disk filled up
(the file stays readable up to the last committed interval); 2 on a usage
error (through cli.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, TextIO

from .. import __version__
from ..analysis import Analyzer, Diagnosis, Thresholds
from ..errors import SourceError
from ..events import Event
from ..snapshot.codec import to_json
from ..snapshot.model import Snapshot
from ..sources import open_source
from ..sources.base import Source
from .writer import DiskFullError, RecordError, RecordingWriter, file_size

MB = 1_000_000


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _kmg(n: int) -> str:
    if n < 10_000:
        return str(n)
    if n < 10_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1e6:.0f}M"


def source_kind(source: Source) -> str:
    """``backend``, ``qemu``, ``file`` ... from the source's class name."""
    name = type(source).__name__
    return (name[:-len("Source")] if name.endswith("Source") else name).lower() or name


class MessageDedup:
    """New entries of a peer that only offers its whole (bounded) message
    log: entries later than the newest seen, or at that same time and not
    seen. Keeps only the entries at the newest time. For the
    ``new_messages()`` of a Source over such a peer."""

    def __init__(self) -> None:
        self.newest = float("-inf")
        self.at_newest: set[str] = set()

    def new(self, log: list[dict]) -> list[dict]:
        out = []
        for m in log:
            t = m.get("time", 0.0)
            if t < self.newest:
                continue
            key = json.dumps(m, sort_keys=True)
            if t == self.newest:
                if key in self.at_newest:
                    continue
            else:
                self.newest, self.at_newest = t, set()
            self.at_newest.add(key)
            out.append(m)
        return out


class Recorder:
    """The record loop over one opened ``source`` into ``path``.

    ``interval``: seconds between snapshots; ``duration``: seconds to run
    (None: until a signal); ``max_size``: bytes (database + WAL) at which to
    stop, or with ``rotate`` go on in ``path.1``, ``path.2`` ...;
    ``tee_jsonl``: also append each committed snapshot to this file as a JSON
    line (to check a recording against what the source returned);
    ``thresholds``: the Analyzer's (``--stall-after``); ``analyzer_class``:
    the Analyzer to build, ``analyzer_class(thresholds,
    notifications_seen=source.has_events)`` (tests give a subclass).
    """

    def __init__(self, source: Source, path: str, *, interval: float = 0.1, duration: float | None = None,
                 max_size: int | None = None, rotate: bool = False, tee_jsonl: str | None = None,
                 keyframe_every: int | None = None, progress: TextIO | None = sys.stderr,
                 argv: list[str] | None = None, thresholds: Thresholds = Thresholds(),
                 analyzer_class: type[Analyzer] = Analyzer):
        self.source = source
        self.thresholds = thresholds
        self.analyzer: Analyzer | None = analyzer_class(thresholds, notifications_seen=source.has_events)
        self._restate = True  # the next interval opens a part: store every queue's verdict
        self.base_path = path
        self.interval = interval
        self.duration = duration
        self.max_size = max_size
        self.rotate = rotate
        self.tee_path = tee_jsonl
        self.keyframe_every = keyframe_every
        self.out = progress
        self.argv = argv
        self.part = 0
        self.paths: list[str] = []
        self.stop = threading.Event()
        self.stop_reason = ""
        self.totals = {"snapshots": 0, "events": 0, "messages": 0, "anomalies": 0, "verdicts": 0}
        self.lost = 0
        self.writer: RecordingWriter | None = None
        self._tee = None

    # -------------------------------------------------------------- pieces
    def header(self) -> dict[str, Any]:
        return {
            "vqscope_version": __version__,
            "kernel": os.uname().release,
            "hostname": socket.gethostname(),
            "source": self.source.name,
            "source_kind": source_kind(self.source),
            "interval_ms": self.interval * 1000,
            "start_time": time.time(),
            "part": self.part,
            "previous_part": os.path.basename(self.paths[-1]) if self.paths else None,
            "argv": self.argv,
            "has_events": self.source.has_events,
            "has_messages": self.source.has_messages,
            "analyzer": None if self.analyzer is None else {**dataclasses.asdict(self.thresholds),
                                                            "notifications_seen": self.source.has_events},
        }

    def _open_writer(self) -> None:
        path = self.base_path if self.part == 0 else f"{self.base_path}.{self.part}"
        kw = {} if self.keyframe_every is None else {"keyframe_every": self.keyframe_every}
        self.writer = RecordingWriter(path, self.header(), **kw)
        self.paths.append(path)
        self._restate = True

    def _close_writer(self) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            for k in self.totals:
                self.totals[k] += getattr(w, k)
            w.close()

    def count(self, what: str) -> int:
        """Total ``what`` (snapshots, events, messages, anomalies, verdicts) over every part."""
        return self.totals[what] + (getattr(self.writer, what) if self.writer is not None else 0)

    def _poll(self) -> tuple[dict, list[Event], list[dict], int, list[Diagnosis]]:
        """One interval's data: the snapshot as its JSON, the events,
        messages, lost-event count and verdicts to store."""
        snapshot = self.source.snapshot()
        events = self.source.events()
        msgs = self.source.new_messages()
        self.lost = self.source.events_lost()
        return to_json(snapshot), events, msgs, self.lost, self._diagnose(snapshot, events)

    def _diagnose(self, snapshot: Snapshot, events: list[Event]) -> list[Diagnosis]:
        """The Analyzer's verdict changes at ``snapshot``; at the first
        interval of a part, every queue's current verdict (restated at this
        snapshot's time)."""
        if self.analyzer is None:
            return []
        try:
            changes = self.analyzer.update(snapshot, events)
            if not self._restate:
                return changes
            t = snapshot.time
            now = (self.analyzer.diagnosis(q.id) for q in snapshot.queues)
            return [d if d.time == t else dataclasses.replace(d, time=t) for d in now if d is not None]
        except Exception as e:  # a bug in a rule must not cost the recording
            self.analyzer = None
            self.writer.set_header("analyzer", None)
            self._say(f"the analyzer failed ({type(e).__name__}: {e}); recording goes on without verdicts "
                      f"(readers compute them from the file)")
            return []

    def _size(self) -> int:
        """Bytes of every part, as committed (RecordingWriter.size)."""
        done = self.paths[:-1] if self.writer is not None else self.paths
        return sum(file_size(p) for p in done) + (self.writer.size() if self.writer is not None else 0)

    def _progress(self, t0: float, final: bool = False) -> None:
        if self.out is None:
            return
        line = (f"vqscope record: {time.monotonic() - t0:7.1f} s  {self.count('snapshots')} snapshots  "
                f"{_kmg(self.count('events'))} events  {self.count('messages')} messages  "
                f"{_human(self._size())}  lost {self.lost}")
        if self.out.isatty():
            self.out.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        elif not final:
            self.out.write(line + "\n")
        self.out.flush()

    def _say(self, msg: str) -> None:
        if self.out is not None:
            if self.out.isatty():
                self.out.write("\r\x1b[K")
            self.out.write(f"vqscope record: {msg}\n")
            self.out.flush()

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        self.stop.set()

    # -------------------------------------------------------------- the loop
    def run(self) -> int:
        """Record until a signal, ``duration``, ``max_size``, a full disk or
        the source going away; returns the exit status."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        t0 = time.monotonic()
        try:
            self._open_writer()
            if self.tee_path:
                self._tee = open(self.tee_path, "w")
            status = self._loop(t0)
        except DiskFullError as e:
            self._say(f"{e}; stopped. {self._where()}")
            status = 1
        except SourceError:
            # Not one snapshot: the source never worked (wrong path, not
            # running). Leave no empty file behind; cli.py reports it.
            self._close_writer()
            for p in self.paths + ([self.tee_path] if self.tee_path else []):
                for f in (p, p + "-wal", p + "-shm"):
                    if os.path.exists(f):
                        os.unlink(f)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            try:
                self._close_writer()
            finally:
                if self._tee is not None:
                    self._tee.close()
        if status == 0 or self.count("snapshots"):
            self._progress(t0, final=True)
            self._say(f"{self.stop_reason or 'stopped'} after {time.monotonic() - t0:.1f} s: "
                      f"{self.count('snapshots')} snapshots, {self.count('events')} events, "
                      f"{self.count('messages')} messages, {self.count('anomalies')} anomalies, "
                      f"{self.count('verdicts')} verdict changes, "
                      f"{self.lost} events lost; {', '.join(self.paths)} ({_human(self._size())})")
        return status

    def _where(self) -> str:
        return (f"{self.paths[-1] if self.paths else self.base_path} is readable up to its last "
                f"committed interval")

    def _loop(self, t0: float) -> int:
        next_tick = time.monotonic()
        last_progress = t0
        end = t0 + self.duration if self.duration is not None else None
        while True:
            final = self.stop.is_set()
            try:
                polled = self._poll()
            except SourceError as e:
                if self.count("snapshots") == 0:
                    raise
                if final:
                    return 0
                self.stop_reason = "source gone"
                self._say(f"source gone: {e}; {self._where()}")
                return 1
            self.writer.write_interval(*polled)
            self._restate = False
            if self._tee is not None:
                self._tee.write(json.dumps(polled[0]) + "\n")
                self._tee.flush()
            polled = None  # nothing kept across intervals
            if final:
                return 0
            now = time.monotonic()
            if now - last_progress >= 1.0:
                self._progress(t0)
                last_progress = now
            if self.max_size is not None and self._size_now() >= self.max_size:
                if not self.rotate:
                    self.stop_reason = "size limit"
                    self._say(f"{self.writer.path} reached --max-size {self.max_size / MB:g} MB; "
                              f"stopping (--rotate would go on in {self.base_path}.{self.part + 1})")
                    return 0
                self._close_writer()
                self.part += 1
                self._open_writer()
                self._say(f"--max-size reached: continuing in {self.writer.path}")
            if end is not None and now >= end:
                self.stop_reason = "duration reached"
                return 0
            next_tick += self.interval
            if next_tick < now:  # fell behind (slow source or disk): skip, don't burst
                next_tick = now
            # A signal sets self.stop: wake at once, write a last interval.
            self.stop.wait(max(0.0, next_tick - time.monotonic()))

    def _size_now(self) -> int:
        return self.writer.size()


def record_main(args) -> int:
    """``vqscope record`` (cli.py parses; see add_parsers in record/cli.py)."""
    if args.interval <= 0:
        raise RecordError(f"--interval {args.interval} ms: give a positive number of milliseconds")
    if args.max_size is not None and args.max_size <= 0:
        raise RecordError(f"--max-size {args.max_size}: give a positive number of MB")
    if args.rotate and args.max_size is None:
        raise RecordError("--rotate goes with --max-size MB (the size at which to start the next file)")
    thresholds = Thresholds()
    if args.stall_after is not None:
        if not args.stall_after > 0:
            raise RecordError(f"--stall-after {args.stall_after}: give a positive number of seconds")
        thresholds = dataclasses.replace(thresholds, stall_s=args.stall_after)
    source = open_source(args)
    with source:
        rec = Recorder(source, args.output, interval=args.interval / 1000, duration=args.duration,
                       max_size=int(args.max_size * MB) if args.max_size is not None else None,
                       rotate=args.rotate, tee_jsonl=args.tee_jsonl,
                       keyframe_every=args.keyframe_every, argv=sys.argv[1:], thresholds=thresholds)
        return rec.run()
