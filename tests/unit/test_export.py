"""`vqscope export`: Chrome Trace Event Format and JSON lines.

The trace is checked against the Trace Event Format's rules (object form;
every event's phase and the keys that phase requires; metadata naming every
process and thread used; counters numeric; slices with a duration), and its
kick/call instant events are counted per queue against
Recording.event_counts() — on a synthetic recording with every kind of
record, and on a real recording of `vqscope demo` made with `vqscope record`.
Verdict slices: on a real recording of the demo whose recorder's Analyzer
declared a queue device_stalled for a while (test_record.StallingAnalyzer),
each queue's slices sit on its thread, are named by its verdicts in order
and tile the recording from the first snapshot to the end; every thread's
slices nest (Perfetto drops overlapping ones), also where a verdict change
falls inside a handler run.
Perfetto's Python trace processor is not used: it downloads its
trace_processor_shell binary at run time, which this machine cannot.
"""

from __future__ import annotations

import json
import random
import subprocess
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from inspector.analysis import Diagnosis, Verdict, diagnosis_to_json
from inspector.events import Event
from inspector.record import Recording, RecordingWriter
from inspector.record.export import write_chrome_trace, write_jsonl
from inspector.recording.reader import to_ns
from inspector.snapshot.codec import to_json
from inspector.snapshot.model import Anomaly, AnomalyKind, QueueEntry, Snapshot

from tests.conftest import ROOT, VQSCOPE
from .test_record import Demo, demo_peer, record_stalling, start_record, stderr_of, tee_lines  # noqa: F401

PHASES = {"M", "i", "C", "X"}
T0 = 1_700_000_000.0


def check_trace(obj: dict) -> list[dict]:
    """Assert ``obj`` is a valid Trace Event Format object (as Perfetto and
    chrome://tracing read it); return its events."""
    assert isinstance(obj, dict) and obj["displayTimeUnit"] == "ns"
    evs = obj["traceEvents"]
    assert isinstance(evs, list)
    names: dict[tuple, str] = {}
    for e in evs:
        assert e["ph"] in PHASES, e
        assert isinstance(e["pid"], int) and isinstance(e["name"], str), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "process_sort_index"), e
            if e["name"] == "process_name":
                names[e["pid"], None] = e["args"]["name"]
            elif e["name"] == "thread_name":
                names[e["pid"], e["tid"]] = e["args"]["name"]
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g") and isinstance(e["tid"], int), e
        elif e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0 and isinstance(e["tid"], int), e
        elif e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
    for e in evs:  # every track used is named
        if e["ph"] != "M":
            assert (e["pid"], None) in names, f"process {e['pid']} has no process_name"
            if e["ph"] != "C":
                assert (e["pid"], e["tid"]) in names, f"thread {e['pid']}/{e['tid']} has no thread_name"
    return evs


def instant_counts(evs: list[dict]) -> Counter:
    """``{(device, queue, kind): n}`` of the trace's instant events, from
    the process and thread names."""
    names = {}
    for e in evs:
        if e["ph"] == "M" and e["name"] in ("process_name", "thread_name"):
            names[e["pid"], e.get("tid") if e["name"] == "thread_name" else None] = e["args"]["name"]
    out = Counter()
    for e in evs:
        if e["ph"] == "i" and e["cat"] == "event":
            thread = names[e["pid"], e["tid"]]
            queue = int(thread.split()[1]) if thread.startswith("queue ") else -1
            out[names[e["pid"], None], queue, e["name"]] += 1
    return out


def make_recording(path: str, n_events: int = 3000, seed: int = 3) -> None:
    """Snapshots of two queues, kicks/calls/handler runs, messages, anomalies."""
    rnd = random.Random(seed)
    t_ns = int(T0 * 1e9) + 1000
    with RecordingWriter(path, {"start_time": T0, "source": "synthetic"}) as w:
        for i in range(20):
            snap = to_json(Snapshot(source="synthetic", time=T0 + 0.1 * (i + 1), queues=[
                QueueEntry(device="net0", index=q, size=256, features=0, event_idx=False, avail_idx=10 * i + q,
                           used_idx=9 * i, inflight=i + q,
                           anomalies=([Anomaly(AnomalyKind.AVAIL_IDX_JUMP, "avail 300 > used 4 + 256")]
                                      if q == 1 and 5 <= i < 9 else []))
                for q in range(2)]))
            evs = []
            for _ in range(n_events // 20):
                t_ns += rnd.randint(1000, 100_000)
                q = rnd.randint(0, 1)
                k = rnd.choice(["kick", "call", "call_suppressed", "handler"])
                if k == "handler":
                    evs.append(Event(t_ns, "net0", q, "handler_start", 10 * i))
                    t_ns += 2000
                    evs.append(Event(t_ns, "net0", q, "handler_end", 2000))
                else:
                    evs.append(Event(t_ns, "net0", q, k, 1))
            msgs = [{"time": T0 + 0.1 * i + 0.05, "conn": 0, "request": "SET_VRING_CALL", "flags": 1, "size": 8,
                     "nfds": 1, "fields": {"index": 0}}] if i % 5 == 0 else []
            w.write_interval(snap, evs, msgs, 0)


def test_chrome_trace_synthetic(tmp_path) -> None:
    path = str(tmp_path / "s.vqs")
    make_recording(path)
    out = tmp_path / "s.json"
    with Recording(path) as rec, open(out, "w") as f:
        n = write_chrome_trace(rec, f)
        counts = rec.event_counts()
        n_anomalies = len(rec.anomalies())
    evs = check_trace(json.loads(out.read_text()))
    assert len(evs) == n
    got = instant_counts(evs)
    for kind in ("kick", "call", "call_suppressed"):
        assert {k: v for k, v in got.items() if k[2] == kind} == {k: v for k, v in counts.items() if k[2] == kind}
    slices = [e for e in evs if e["ph"] == "X" and e["cat"] == "handler"]
    assert len(slices) == sum(v for k, v in counts.items() if k[2] == "handler_end") > 0
    assert all(e["dur"] == 2.0 and e["name"] == "handler" for e in slices)
    anomalies = [e for e in evs if e.get("cat") == "anomaly"]
    assert len(anomalies) == n_anomalies == 1 and anomalies[0]["name"] == "anomaly: avail_idx_jump"
    assert [e["name"] for e in evs if e.get("cat") == "vhost-user"] == ["SET_VRING_CALL"] * 4
    counters = [e for e in evs if e["ph"] == "C"]
    assert len(counters) == 2 * 20 and {e["name"] for e in counters} == {"queue 0", "queue 1"}
    assert counters[0]["args"] == {"inflight": 0, "avail_idx": 0, "used_idx": 0}
    # µs from the start: the first snapshot is 0.1 s after start_time.
    assert counters[0]["ts"] == pytest.approx(100_000.0)


def test_jsonl_time_order(tmp_path) -> None:
    path = str(tmp_path / "j.vqs")
    make_recording(path, n_events=600)
    out = tmp_path / "j.jsonl"
    with Recording(path) as rec, open(out, "w") as f:
        write_jsonl(rec, f)
        snaps = list(rec.snapshots())
        n_events = sum(rec.event_counts().values())
        n_verdicts = len(rec.verdict_changes())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    types = Counter(o["type"] for o in lines)
    assert n_verdicts >= 2  # computed (the writer alone stores none): each queue's first verdict at least
    assert types == {"snapshot": 20, "event": n_events, "message": 4, "anomaly": 1, "verdict": n_verdicts}

    def t(o):
        return o["time_ns"] / 1e9 if o["type"] == "event" else (
            o["snapshot"]["time"] if o["type"] == "snapshot" else o["time"])
    times = [t(o) for o in lines]
    assert all(a <= b + 1e-6 for a, b in zip(times, times[1:]))
    assert [o["snapshot"] for o in lines if o["type"] == "snapshot"] == snaps


def _export_peak(tmp_path, intervals: int) -> tuple[int, int]:
    """(peak traced memory, trace bytes) exporting ``intervals`` intervals
    of 10 000 kicks on 64 queues."""
    path = str(tmp_path / f"big{intervals}.vqs")
    rnd = random.Random(5)
    t = int(T0 * 1e9)
    with RecordingWriter(path, {"start_time": T0}) as w:
        for i in range(intervals):
            evs = []
            for _ in range(10_000):
                t += rnd.randint(100, 2000)
                evs.append(Event(t, "net0", rnd.randint(0, 63), "kick", 1))
            w.write_interval({"source": "synthetic", "time": t / 1e9, "queues": []}, evs)
    out = tmp_path / f"big{intervals}.json"
    tracemalloc.start()
    try:
        with Recording(path) as rec, open(out, "w") as f:
            write_chrome_trace(rec, f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, out.stat().st_size


def test_chrome_trace_streams(tmp_path) -> None:
    """Export memory does not grow with the recording (the trace is written
    as it is built; events are decoded a few blocks at a time): three times
    the events, about the same peak."""
    small_peak, small_size = _export_peak(tmp_path, 2)
    big_peak, big_size = _export_peak(tmp_path, 6)
    assert big_size > 2.5 * small_size
    assert big_peak < 1.5 * small_peak, (small_peak, big_peak)


@pytest.mark.timeout(120)
def test_export_real_recording(tmp_path) -> None:
    """`vqscope record` of the demo, then `vqscope export` both formats."""
    out = tmp_path / "demo.vqs"
    with Demo() as demo:
        p = start_record(out, demo.sock, "--duration", "3")
        assert p.wait(60) == 0, stderr_of(out)
    assert len(tee_lines(out)) > 10
    trace = tmp_path / "demo.json"
    r = subprocess.run([*VQSCOPE, "export", str(out), "--format", "chrome-trace", "-o", str(trace)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    evs = check_trace(json.loads(trace.read_text()))
    with Recording(str(out)) as rec:
        counts = rec.event_counts()
        n_msgs = len(rec.messages())
        devices = {q["device"] for q in rec.snapshot(0)["queues"]}
    got = instant_counts(evs)
    for kind in ("kick", "call"):
        assert {k: v for k, v in got.items() if k[2] == kind} == {k: v for k, v in counts.items() if k[2] == kind}
    if any(k[2] == "kick" for k in counts):
        assert sum(v for k, v in got.items() if k[2] == "kick") > 0
    assert len([e for e in evs if e.get("cat") == "vhost-user"]) == n_msgs > 0
    procs = {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert devices <= procs and "vhost-user" in procs
    assert any(e["ph"] == "C" for e in evs)

    jl = tmp_path / "demo.jsonl"
    r = subprocess.run([*VQSCOPE, "export", str(out), "--format", "jsonl", "-o", str(jl)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    types = Counter(json.loads(line)["type"] for line in Path(jl).read_text().splitlines())
    assert types["snapshot"] == len(tee_lines(out)) and types["message"] == n_msgs
    assert types["event"] == sum(counts.values())


def test_export_errors(tmp_path) -> None:
    bad = tmp_path / "bad.vqs"
    bad.write_text("not sqlite at all" * 100)
    r = subprocess.run([*VQSCOPE, "export", str(bad), "--format", "jsonl", "-o", str(tmp_path / "o")],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad.vqs: not a vqscope recording" in r.stderr, r.stderr


def thread_slices(evs: list[dict], cat: str) -> dict[tuple[str, str], list[dict]]:
    """``{(process name, thread name): [slices of category cat by ts]}``."""
    names = {}
    for e in evs:
        if e["ph"] == "M" and e["name"] in ("process_name", "thread_name"):
            names[e["pid"], e.get("tid") if e["name"] == "thread_name" else None] = e["args"]["name"]
    out: dict[tuple[str, str], list[dict]] = {}
    for e in evs:
        if e["ph"] == "X" and e["cat"] == cat:
            out.setdefault((names[e["pid"], None], names[e["pid"], e["tid"]]), []).append(e)
    return {k: sorted(v, key=lambda e: e["ts"]) for k, v in out.items()}


def check_nesting(evs: list[dict]) -> None:
    """Every two complete slices of a thread nest or do not overlap (the
    Trace Event Format's rule for ``X``; Perfetto drops the others)."""
    by_thread: dict[tuple, list] = {}
    for e in evs:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for slices in by_thread.values():
        stack: list[float] = []
        for e in sorted(slices, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"] + 1e-6:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-6, f"{e} overlaps its parent, which ends at {stack[-1]}"
            stack.append(end)


def check_tiling(slices: list[dict], changes: list[Diagnosis], start_s: float, end_s: float) -> None:
    """The verdict slices of one queue are its ``changes`` in order, each
    from its change to the next, the last to ``end_s``."""
    assert [e["name"] for e in slices] == [d.verdict.value for d in changes]
    assert [e["args"] for e in slices] == [{"evidence": d.evidence, "since": d.since,
                                            "severity": d.severity.name.lower(), "role": d.role} for d in changes]
    # µs; a time in s since the epoch holds ~0.25 µs.
    assert [e["ts"] for e in slices] == pytest.approx([(d.time - start_s) * 1e6 for d in changes], abs=0.5)
    for a, b in zip(slices, slices[1:]):
        assert a["ts"] + a["dur"] == pytest.approx(b["ts"], abs=1e-6)
    assert slices[-1]["ts"] + slices[-1]["dur"] == pytest.approx((end_s - start_s) * 1e6, abs=0.5)


@pytest.mark.timeout(120)
def test_chrome_trace_verdict_slices(tmp_path, demo_peer) -> None:
    """`vqscope export` of a real recording whose verdicts include a
    device_stalled: slices per queue on its thread, tiling the recording;
    jsonl carries the same changes."""
    out = tmp_path / "stall.vqs"
    record_stalling(out, demo_peer.sock)
    trace = tmp_path / "stall.json"
    r = subprocess.run([*VQSCOPE, "export", str(out), "--format", "chrome-trace", "-o", str(trace)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    evs = check_trace(json.loads(trace.read_text()))
    check_nesting(evs)
    with Recording(str(out)) as rec:
        changes = rec.verdict_changes()
        first, end_s = rec.time_bounds()
        start_s = min(first, rec.header["start_time"])
    per_queue: dict[tuple, list[Diagnosis]] = {}
    for d in changes:
        per_queue.setdefault(d.id, []).append(d)
    tracks = thread_slices(evs, "verdict")
    assert set(tracks) == {(dev, f"queue {i}") for dev, i in per_queue}
    for (dev, i), ds in per_queue.items():
        check_tiling(tracks[dev, f"queue {i}"], ds, start_s, end_s)
    stalled = [e for sl in tracks.values() for e in sl if e["name"] == "device_stalled"]
    assert len(stalled) == 1 and stalled[0]["args"]["evidence"].startswith("fake: avail_idx ")
    assert stalled[0]["dur"] > 0

    jl = tmp_path / "stall.jsonl"
    r = subprocess.run([*VQSCOPE, "export", str(out), "--format", "jsonl", "-o", str(jl)],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [o for o in lines if o["type"] == "verdict"] == [{"type": "verdict", **diagnosis_to_json(d)}
                                                             for d in changes]


def test_verdict_slices_nest_around_handlers(tmp_path) -> None:
    """A verdict change that falls while a handler runs on that queue starts
    at the handler's end; a handler whose start was not recorded starts no
    earlier than the verdict slice it ends in (args.clipped). Every slice
    then nests, and the verdicts still tile."""
    path = str(tmp_path / "h.vqs")
    t1, t2, t3 = T0 + 1, T0 + 2, T0 + 3
    n2, n3 = to_ns(t2), to_ns(t3)

    def snap(t: float) -> dict:
        return to_json(Snapshot(source="synthetic", time=t, queues=[
            QueueEntry(device="net0", index=0, size=256, features=0, event_idx=False)]))

    def diag(v: Verdict, t: float) -> Diagnosis:
        return Diagnosis("net0", 0, v, since=t - 0.5, evidence=f"{v} at {t}", role="consume", time=t)

    changes = [diag(Verdict.IDLE, t1), diag(Verdict.DEVICE_STALLED, t2), diag(Verdict.HEALTHY, t3)]
    with RecordingWriter(path, {"start_time": T0, "analyzer": {"stall_s": 2.0}}) as w:
        w.write_interval(snap(t1), [], (), 0, changes[:1])
        w.write_interval(snap(t2), [Event(n2 - 1000, "net0", 0, "handler_start", 7),
                                    Event(n2 + 1000, "net0", 0, "handler_end", 2000)], (), 0, changes[1:2])
        w.write_interval(snap(t3), [Event(n3 + 1000, "net0", 0, "handler_end", 5000),   # its start was lost
                                    Event(n3 + 2000, "net0", 0, "kick", 1)], (), 0, changes[2:])
    out = tmp_path / "h.json"
    with Recording(path) as rec, open(out, "w") as f:
        assert rec.verdict_changes() == changes
        write_chrome_trace(rec, f)
        end_s = rec.time_bounds()[1]
    evs = check_trace(json.loads(out.read_text()))
    check_nesting(evs)

    def us(ns: int) -> float:
        return (ns - to_ns(T0)) / 1000

    verdicts = thread_slices(evs, "verdict")["net0", "queue 0"]
    handlers = thread_slices(evs, "handler")["net0", "queue 0"]
    assert [e["name"] for e in verdicts] == ["idle", "device_stalled", "healthy"]
    assert verdicts[1]["ts"] == us(n2 + 1000)          # at the handler's end, not inside it
    assert verdicts[2]["ts"] == us(n3)
    assert (handlers[0]["ts"], handlers[0]["dur"]) == (us(n2 - 1000), 2.0)
    assert (handlers[1]["ts"], handlers[1]["dur"]) == (us(n3), 1.0)
    assert handlers[1]["args"] == {"last_avail_idx": None, "duration_ns": 5000, "clipped": True}
    for a, b in zip(verdicts, verdicts[1:]):
        assert a["ts"] + a["dur"] == pytest.approx(b["ts"], abs=1e-6)
    assert verdicts[-1]["ts"] + verdicts[-1]["dur"] == pytest.approx((end_s - T0) * 1e6, abs=0.5)
