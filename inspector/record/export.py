"""``vqscope export``: a recording as a Chrome/Perfetto trace or as JSON lines.

Chrome Trace Event Format (the JSON object form: ``{"traceEvents": [...],
"displayTimeUnit": "ns"}``), which Perfetto UI and chrome://tracing open:

- one process per device (``M`` ``process_name``), one thread per queue
  (``M`` ``thread_name`` "queue N"; thread "device" for events tied to no
  queue);
- each event (kick, call, call_suppressed ...) an instant event (``ph: i``,
  thread scope) named by its kind, ``args.value`` its value; a
  ``handler_start``/``handler_end`` pair a complete slice (``ph: X``)
  "handler";
- per queue a counter track (``ph: C``) "queue N" with ``inflight``,
  ``avail_idx``, ``used_idx`` from the snapshots, at each change (a packed
  queue, §2.8: ``inflight``, ``next_avail``, ``next_used``, the slots; a
  value the snapshot does not have is left out: counters are numbers);
- each anomaly an instant event "anomaly: KIND" on its queue's thread;
- each queue's verdicts (``Recording.verdict_changes``) as complete slices
  (``ph: X``, ``cat: verdict``) on its queue's thread, named by the verdict
  (healthy, idle, device_stalled ...), ``args`` its ``evidence``, ``since``
  (s since the epoch: when it began to hold, which may precede the slice),
  ``severity`` and ``role``; one slice from each change to the queue's next,
  the last to the recording's end;
- vhost-user messages instant events on process "vhost-user", one thread
  per connection, named by the request.

Verdict slices tile the queue's thread from its first snapshot to the end,
healthy and idle ones included: every moment then reads as a verdict, and a
fault shows as a named slice between the healthy ones around it, its length
how long it lasted and where it cleared; with only the unhealthy ones, a gap
would not tell healthy from "not recorded" or "queue gone". They are one
slice per change, few beside the events. They are the outermost slice of
the thread (depth 0): the queue's handler slices and instant events nest
inside them, so that Perfetto, which drops ``X`` events that overlap
without nesting, keeps every one. A change that falls while a handler runs
on that queue therefore starts at that handler's end (µs later); a handler
whose start was not recorded starts no earlier than the verdict slice it
ends in (``args.clipped``, ``duration_ns`` still the true one).

Timestamps are µs (floats) from the recording's start (header
``start_time``, or the first message when the back-end logged its handshake
before the recorder attached). Output is streamed: memory does not grow with the file
(the verdict changes, one per change, are read whole).

JSON lines: one object per line, ``type`` snapshot / event / message /
anomaly / verdict (``inspector.analysis.diagnosis_to_json``), merged in time order.
"""

from __future__ import annotations

import heapq
import json
import sys
from typing import Any, Iterator, TextIO

from ..analysis import Diagnosis, diagnosis_to_json
from ..errors import InspectorError
from ..recording import Recording
from ..recording.reader import to_ns

FORMATS = ("chrome-trace", "jsonl")


class ExportError(InspectorError):
    """An export that cannot be written."""


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _Tracks:
    """pids for devices (and the vhost-user process), tids for queues and
    connections, each announced with its metadata event on first use."""

    def __init__(self, emit):
        self.emit = emit
        self.pids: dict[str, int] = {}
        self.tids: set[tuple[int, int]] = set()

    def pid(self, process: str) -> int:
        p = self.pids.get(process)
        if p is None:
            p = self.pids[process] = len(self.pids) + 1
            self.emit({"ph": "M", "name": "process_name", "pid": p, "tid": 0, "args": {"name": process}})
            self.emit({"ph": "M", "name": "process_sort_index", "pid": p, "tid": 0, "args": {"sort_index": p}})
        return p

    def thread(self, process: str, tid: int, name: str) -> tuple[int, int]:
        p = self.pid(process)
        if (p, tid) not in self.tids:
            self.tids.add((p, tid))
            self.emit({"ph": "M", "name": "thread_name", "pid": p, "tid": tid, "args": {"name": name}})
        return p, tid

    def queue(self, device: str, queue: int) -> tuple[int, int]:
        return self.thread(device, queue + 1, f"queue {queue}" if queue >= 0 else "device")


class _VerdictSlices:
    """Per queue, the verdict slice being drawn: a change closes the open
    slice and opens the next (module docstring). Times are ns since the
    epoch; ``us`` turns them into trace µs."""

    def __init__(self, tracks: _Tracks, emit, us):
        self.tracks, self.emit, self.us = tracks, emit, us
        self.open: dict[tuple[str, int], tuple[int, Diagnosis]] = {}
        self.deferred: dict[tuple[str, int], list[Diagnosis]] = {}

    def start_ns(self, key: tuple[str, int]) -> int | None:
        """Where the queue's open slice began, or None."""
        cur = self.open.get(key)
        return None if cur is None else cur[0]

    def change(self, d: Diagnosis, handler_running: bool) -> None:
        """Verdict change ``d``; ``handler_running``: a handler runs on its
        queue now (the change waits for :meth:`handler_ended`)."""
        if handler_running:
            self.deferred.setdefault(d.id, []).append(d)
        else:
            self._boundary(d.id, to_ns(d.time), d)

    def handler_ended(self, key: tuple[str, int], t_ns: int) -> None:
        for d in self.deferred.pop(key, ()):
            self._boundary(key, t_ns, d)

    def _boundary(self, key: tuple[str, int], t_ns: int, d: Diagnosis | None) -> None:
        cur = self.open.pop(key, None)
        if cur is not None:
            start, old = cur
            t_ns = max(t_ns, start)
            pid, tid = self.tracks.queue(*key)
            self.emit({"name": old.verdict.value, "cat": "verdict", "ph": "X", "ts": self.us(start),
                       "dur": (t_ns - start) / 1000, "pid": pid, "tid": tid,
                       "args": {"evidence": old.evidence, "since": old.since,
                                "severity": old.severity.name.lower(), "role": old.role}})
        if d is not None:
            self.open[key] = (t_ns, d)

    def unfinished(self) -> None:
        """The changes still waiting, at their own time: their handler never
        ended (it is drawn as an instant, not a slice)."""
        for key, ds in self.deferred.items():
            for d in ds:
                self._boundary(key, to_ns(d.time), d)
        self.deferred.clear()

    def close(self, end_ns: int) -> None:
        """Close every open slice at ``end_ns``."""
        for key in list(self.open):
            self._boundary(key, end_ns, None)


#: The counter track's values of a split and of a packed queue (snapshot members).
_SPLIT_COUNTERS = ("inflight", "avail_idx", "used_idx")
_PACKED_COUNTERS = ("inflight", "next_avail", "next_used")


def chrome_trace_events(rec: Recording) -> Iterator[dict]:
    """The trace events of ``rec``, streamed (module docstring)."""
    buf: list[dict] = []
    tracks = _Tracks(buf.append)
    # Time 0 is the recording's start, or the first thing in it when earlier
    # (the handshake's messages, logged before the recorder attached).
    start_s, end_s = rec.time_bounds()
    if isinstance(rec.header.get("start_time"), (int, float)):
        start_s = min(start_s, rec.header["start_time"])
    start_ns = to_ns(start_s)

    def us_s(t: float) -> float:
        return round((t - start_s) * 1e6, 3)

    def us_ns(t: int) -> float:
        return (t - start_ns) / 1000

    def flush():
        yield from buf
        buf.clear()

    # Counters from the snapshots: only where a queue's indices changed.
    last: dict[tuple, tuple] = {}
    for snap in rec.snapshots():
        t = snap.get("time")
        if not isinstance(t, (int, float)):
            continue
        for q in snap.get("queues") or ():
            if not isinstance(q, dict):
                continue
            key = (str(q.get("device")), q.get("index"))
            names = _PACKED_COUNTERS if q.get("layout") == "packed" else _SPLIT_COUNTERS
            vals = tuple(q.get(n) for n in names)
            if last.get(key) == vals:
                continue
            last[key] = vals
            pid, tid = tracks.queue(key[0], key[1] if isinstance(key[1], int) else -1)
            buf.append({"name": f"queue {key[1]}", "cat": "ring", "ph": "C", "ts": us_s(t), "pid": pid,
                        "args": {n: v for n, v in zip(names, vals) if isinstance(v, (int, float))}})
        yield from flush()

    # Events; handler_start/handler_end pairs as slices, inside the verdict
    # slices (changes merged in at their time, before events of the same ns).
    changes = rec.verdict_changes()
    verdicts = _VerdictSlices(tracks, buf.append, us_ns)
    k = 0
    open_handlers: dict[tuple[str, int], Any] = {}
    for e in rec.events():
        time_ns, device, queue, kind, value = e
        while k < len(changes) and to_ns(changes[k].time) <= time_ns:
            verdicts.change(changes[k], changes[k].id in open_handlers)
            k += 1
        pid, tid = tracks.queue(device, queue)
        if kind == "handler_start":
            open_handlers[device, queue] = e
        elif kind == "handler_end":
            st = open_handlers.pop((device, queue), None)
            begin = st[0] if st is not None else time_ns - value
            args = {"last_avail_idx": st[4] if st is not None else None, "duration_ns": value}
            vstart = verdicts.start_ns((device, queue))
            if vstart is not None and begin < vstart <= time_ns:  # its start was not recorded
                begin, args["clipped"] = vstart, True
            buf.append({"name": "handler", "cat": "handler", "ph": "X", "ts": us_ns(begin),
                        "dur": (time_ns - begin) / 1000, "pid": pid, "tid": tid, "args": args})
            verdicts.handler_ended((device, queue), time_ns)
        else:
            buf.append({"name": kind, "cat": "event", "ph": "i", "s": "t", "ts": us_ns(time_ns),
                        "pid": pid, "tid": tid, "args": {"value": value}})
        if len(buf) >= 256:
            yield from flush()
    for (device, queue), st in open_handlers.items():  # a handler still running when the recording ended
        pid, tid = tracks.queue(device, queue)
        buf.append({"name": "handler_start", "cat": "handler", "ph": "i", "s": "t", "ts": us_ns(st[0]),
                    "pid": pid, "tid": tid, "args": {"last_avail_idx": st[4], "unfinished": True}})
    verdicts.unfinished()
    for d in changes[k:]:
        verdicts.change(d, False)
    verdicts.close(max(to_ns(end_s), start_ns))
    yield from flush()

    for a in rec.anomalies():
        pid, tid = tracks.queue(a["device"], a["queue"])
        buf.append({"name": f"anomaly: {a['kind']}", "cat": "anomaly", "ph": "i", "s": "t",
                    "ts": us_s(a["time"]), "pid": pid, "tid": tid,
                    "args": {"detail": a["detail"], "snapshot": a["index"]}})
        yield from flush()

    for m in rec.iter_messages():
        conn = m.get("connection", m.get("conn"))
        conn = conn if isinstance(conn, int) else 0
        pid, tid = tracks.thread("vhost-user", conn + 1, f"connection {conn}")
        t = m.get("time")
        buf.append({"name": str(m.get("request")), "cat": "vhost-user", "ph": "i", "s": "t",
                    "ts": us_s(t) if isinstance(t, (int, float)) else 0.0, "pid": pid, "tid": tid,
                    "args": {k: m.get(k) for k in ("flags", "size", "nfds", "fields", "error") if k in m}})
        yield from flush()


def write_chrome_trace(rec: Recording, out: TextIO) -> int:
    """Write the trace JSON object to ``out``, one event per line; returns
    the number of trace events."""
    out.write('{"displayTimeUnit":"ns","otherData":')
    out.write(_dump({k: rec.header.get(k) for k in ("vqscope_version", "source", "hostname", "kernel",
                                                    "start_time", "interval_ms")}))
    out.write(',"traceEvents":[\n')
    n = 0
    for ev in chrome_trace_events(rec):
        if n:
            out.write(",\n")
        out.write(_dump(ev))
        n += 1
    out.write("\n]}\n")
    return n


def jsonl_records(rec: Recording) -> Iterator[dict]:
    """Snapshots, events, messages, anomalies and verdict changes as dicts
    with ``type``, merged in time order (on equal times in that order)."""
    def snaps():
        for i, s in enumerate(rec.snapshots()):
            t = s.get("time")
            yield (to_ns(t) if isinstance(t, (int, float)) else 0, 0, i,
                   {"type": "snapshot", "index": i, "snapshot": s})

    def events():
        for i, e in enumerate(rec.events()):
            yield (e[0], 1, i, {"type": "event", **e._asdict()})

    def messages():
        for i, m in enumerate(rec.iter_messages()):
            t = m.get("time")
            yield (to_ns(t) if isinstance(t, (int, float)) else 0, 2, i, {"type": "message", **m})

    def anomalies():
        for i, a in enumerate(rec.anomalies()):
            yield (to_ns(a["time"]), 3, i, {"type": "anomaly", **a})

    def verdicts():
        for i, d in enumerate(rec.verdict_changes()):
            yield (to_ns(d.time), 4, i, {"type": "verdict", **diagnosis_to_json(d)})

    for *_, obj in heapq.merge(snaps(), events(), messages(), anomalies(), verdicts(), key=lambda r: r[:3]):
        yield obj


def write_jsonl(rec: Recording, out: TextIO) -> int:
    n = 0
    for obj in jsonl_records(rec):
        out.write(_dump(obj) + "\n")
        n += 1
    return n


def export_main(args) -> int:
    """``vqscope export FILE --format chrome-trace|jsonl -o OUT`` (``-`` for stdout)."""
    write = {"chrome-trace": write_chrome_trace, "jsonl": write_jsonl}[args.format]
    with Recording(args.file) as rec:
        if args.output == "-":
            write(rec, sys.stdout)
            return 0
        try:
            out = open(args.output, "w")
        except OSError as e:
            raise ExportError(f"cannot write {args.output}: {e.strerror}") from e
        with out:
            n = write(rec, out)
    print(f"vqscope export: {n} {'trace events' if args.format == 'chrome-trace' else 'records'} "
          f"to {args.output}", file=sys.stderr)
    return 0
