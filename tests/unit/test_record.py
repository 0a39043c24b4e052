"""The recorder: file format, writer, reader, and `vqscope record`
against real back-ends.

- codec: snapshot deltas (hypothesis: random snapshot sequences round-trip
  exactly, with and without keyframes), event blocks (round-trip of any
  int64 times and values).
- reader: time order across blocks, time ranges, counts without decoding,
  and its errors (missing, not SQLite, not ours, unknown schema, empty).
- `vqscope record --connect` on a running `vqscope demo --headless` (our
  back-end with our front-end moving traffic): the replay equals what the
  recorder took (its --tee-jsonl copy), index for index; the message table
  holds the vhost-user handshake; events and their counts agree with the
  back-end's own kick/call counters. SIGKILL mid-run leaves a file that
  replays up to the last commit; SIGINT/SIGTERM flush and exit 0; the demo
  going away ends the recording with exit 1.
- limits: --max-size stop and --rotate; a full disk (a small tmpfs mounted
  here) stops with exit 1 and a readable file.
- DPDK testpmd (virtio-user) against `vqscope serve net` recorded likewise.
- verdicts (schema version 2): the recorder's Analyzer changes are stored
  and read back (recordings of the demo, with the real Analyzer and with a
  subclass that declares a queue device_stalled for a while, so that a
  specific unhealthy verdict must go through whatever the real rules say);
  a version-1 file (the same recording without the table) gets them
  computed from its snapshots and events; rotated parts each start with
  every queue's verdict; an Analyzer that raises costs the verdicts, not
  the recording.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector.analysis import Analyzer, Diagnosis, Severity, Thresholds, Verdict, verdict_timeline
from inspector.events import Event
from inspector.record import Recording, RecordingError, RecordingWriter
from inspector.recording import codec
from inspector.record.recorder import MessageDedup, Recorder
from inspector.recording.reader import to_ns
from inspector.recording.schema import SCHEMA_VERSION
from inspector.snapshot.codec import to_json
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.sources.backend import BackendSource
from inspector.sources.base import Source
from inspector.sources.replay import ReplaySource

from tests.conftest import ROOT, VQSCOPE, require, wait_for
from tests.support.peers import Peer, is_root, socket_dir, wait_path

# ----------------------------------------------------------------- strategies

_ints = st.integers(min_value=-(2 ** 40), max_value=2 ** 40)
_desc = st.fixed_dictionaries({"addr": st.integers(0, 2 ** 48), "len": st.integers(0, 65536),
                               "flags": st.integers(0, 7), "next": st.integers(0, 255)})
_chain = st.fixed_dictionaries({"head": st.integers(0, 255), "descs": st.lists(_desc, max_size=3),
                                "out_bytes": st.integers(0, 9000), "in_bytes": st.integers(0, 9000)})
_anomaly = st.fixed_dictionaries({"kind": st.sampled_from(["desc_loop", "next_out_of_range", "ring_unmapped"]),
                                  "detail": st.text(max_size=8)})


@st.composite
def _queue(draw):
    q = {"device": draw(st.sampled_from(["net0", "net1", "blk0"])), "index": draw(st.integers(0, 3)),
         "layout": "split", "size": 256, "features": draw(st.integers(0, 2 ** 40)),
         "event_idx": draw(st.booleans()), "avail_idx": draw(st.integers(0, 65535)),
         "used_idx": draw(st.integers(0, 65535)), "last_avail_idx": draw(st.none() | st.integers(0, 65535)),
         "used_event": draw(st.none() | st.integers(0, 65535)),
         "chains": draw(st.lists(_chain, max_size=5)), "anomalies": draw(st.lists(_anomaly, max_size=2))}
    for extra in draw(st.lists(st.sampled_from(["qemu", "kicks", "calls", "x"]), max_size=2, unique=True)):
        q[extra] = draw(_ints | st.text(max_size=4) | st.lists(_ints, max_size=2))
    return q


@st.composite
def _evolve(draw, prev: dict) -> dict:
    """A next snapshot: mostly small changes of ``prev`` (how rings move),
    sometimes a queue added, dropped, reordered, a chain window shifted."""
    snap = dict(prev, time=prev["time"] + draw(st.floats(0.001, 1.0)))
    queues = [dict(q) for q in prev["queues"]]
    for q in queues:
        if draw(st.booleans()):
            q["avail_idx"] = (q["avail_idx"] + draw(st.integers(0, 300))) % 65536
        if draw(st.integers(0, 3)) == 0:
            q["used_event"] = draw(st.none() | st.integers(0, 65535))
        choice = draw(st.integers(0, 4))
        if choice == 0:
            q["chains"] = q["chains"][draw(st.integers(0, 3)):] + draw(st.lists(_chain, max_size=3))
        elif choice == 1:
            q["chains"] = draw(st.lists(_chain, max_size=4))
        elif choice == 2 and q["chains"]:
            q["chains"] = [dict(c, in_bytes=c["in_bytes"] + 1) for c in q["chains"]]
        if draw(st.integers(0, 5)) == 0:
            q["anomalies"] = draw(st.lists(_anomaly, max_size=2))
        if draw(st.integers(0, 8)) == 0:
            q.pop("used_event", None)
        if draw(st.integers(0, 8)) == 0:
            q["new_field"] = draw(_ints | st.booleans())
    op = draw(st.integers(0, 7))
    if op == 0:
        queues.append(draw(_queue()))
    elif op == 1 and queues:
        queues.pop(draw(st.integers(0, len(queues) - 1)))
    elif op == 2:
        queues.reverse()
    snap["queues"] = queues
    if draw(st.integers(0, 6)) == 0:
        snap["skipped"] = draw(st.lists(st.text(max_size=5), max_size=2))
    if draw(st.integers(0, 9)) == 0:
        snap.pop("source", None)
    return snap


@st.composite
def snapshot_sequences(draw) -> list[dict]:
    first = {"source": "backend:/tmp/x", "time": draw(st.floats(1e9, 2e9)),
             "queues": draw(st.lists(_queue(), max_size=4))}
    seq = [first]
    for _ in range(draw(st.integers(0, 12))):
        seq.append(draw(_evolve(seq[-1])))
    return seq


def _json_copy(x):
    return json.loads(json.dumps(x))


# ----------------------------------------------------------------- codec

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_sequences())
def test_delta_roundtrip_random_sequences(seq: list[dict]) -> None:
    """encode_delta/apply_delta through JSON give back every snapshot exactly."""
    cur = seq[0]
    for prev, nxt in zip(seq, seq[1:]):
        d = _json_copy(codec.encode_delta(prev, nxt))
        cur = codec.apply_delta(cur, d)
        assert cur == nxt
    if len(seq) > 1 and seq[1] == seq[0] | {"time": seq[1]["time"]}:
        assert set(codec.encode_delta(seq[0], seq[1])) <= {"t"}


def test_delta_chain_window_is_small() -> None:
    """A ring that moved on by a few chains stores only the new ones."""
    chains = [{"head": i, "descs": [{"addr": 4096 * i, "len": 1536, "flags": 2, "next": 0}],
               "out_bytes": 0, "in_bytes": 1536} for i in range(200)]
    a = {"time": 1.0, "queues": [{"device": "net0", "index": 0, "avail_idx": 200, "chains": chains}]}
    b = {"time": 1.1, "queues": [{"device": "net0", "index": 0, "avail_idx": 203,
                                  "chains": chains[5:] + chains[:3]}]}
    d = codec.encode_delta(a, b)
    assert d["q"] == [[0, {"c": {"drop": 5, "keep": 195, "add": chains[:3]}, "s": {"avail_idx": 203}}]]
    assert codec.apply_delta(a, d) == b
    assert len(json.dumps(d)) < len(json.dumps(b)) / 20


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_sequences(), st.integers(1, 5))
def test_writer_reader_roundtrip(tmp_path_factory, seq: list[dict], keyframe_every: int) -> None:
    """Through a real file, with keyframes every K: snapshots(), snapshot(i)
    in any order and the anomaly table all agree with the input."""
    path = str(tmp_path_factory.mktemp("rt") / "r.vqs")
    with RecordingWriter(path, {"source": "test"}, keyframe_every=keyframe_every) as w:
        for s in seq:
            w.write_interval(s)
    with Recording(path) as rec:
        assert len(rec) == len(seq)
        assert list(rec.snapshots()) == seq
        order = list(range(len(seq)))
        random.Random(len(seq)).shuffle(order)
        for i in order:
            assert rec.snapshot(i) == seq[i]
        assert rec.snapshot_times() == [s["time"] for s in seq]
        # Anomalies: each (device, queue, kind) once when it appears.
        want, active = [], set()
        for i, s in enumerate(seq):
            now = set()
            for q in s["queues"]:
                for a in q.get("anomalies") or ():
                    k = (q["device"], q["index"], a["kind"])
                    if k not in active and k not in now:
                        want.append(i)
                    now.add(k)
            active = now
        assert rec.anomaly_indices() == sorted(set(want))
        assert len(rec.anomalies()) == len(want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2 ** 63), 2 ** 63 - 1), st.integers(0, 255),
                          st.integers(-(2 ** 63), 2 ** 63 - 1)), min_size=1, max_size=300))
def test_event_block_roundtrip(rows) -> None:
    times, kinds, values = zip(*rows)
    data = codec.encode_events(times, bytes(kinds), values)
    t, k, v = codec.decode_events(data, len(rows))
    assert (list(t), bytes(k), list(v)) == (list(times), bytes(kinds), list(values))
    with pytest.raises(codec.CodecError):
        codec.decode_events(data, len(rows) + 1)


def test_event_value_outside_int64_is_refused(tmp_path) -> None:
    with RecordingWriter(str(tmp_path / "e.vqs"), {}) as w:
        with pytest.raises(Exception, match="int64"):
            w.write_interval({"time": 1.0, "queues": []}, [Event(1, "net0", 0, "kick", 2 ** 64)])
        w.write_interval({"time": 1.0, "queues": []}, [Event(1, "net0", 0, "kick", 1)])
    with Recording(str(tmp_path / "e.vqs")) as rec:  # the refused interval left nothing behind
        assert len(rec) == 1 and list(rec.events()) == [Event(1, "net0", 0, "kick", 1)]


# ----------------------------------------------------------------- reader

def _synthetic_events(n: int, seed: int = 1, queues: int = 8, t0: int = 1_700_000_000_000_000_000):
    rnd = random.Random(seed)
    t = t0
    out = []
    for i in range(n):
        t += rnd.randint(0, 5000)
        kind = rnd.choice(["kick", "call", "call", "call_suppressed", "handler_start", "handler_end"])
        # Sources may deliver slightly out of order across CPUs: jitter.
        out.append(Event(t + rnd.randint(-300, 300), f"net{rnd.randint(0, 1)}", rnd.randint(-1, queues - 1),
                         kind, rnd.randint(0, 1 << 40)))
    return out


def test_events_time_order_ranges_and_counts(tmp_path) -> None:
    path = str(tmp_path / "ev.vqs")
    evs = _synthetic_events(20_000)
    with RecordingWriter(path, {}) as w:
        for k in range(0, len(evs), 1500):  # intervals of 1500 events: blocks overlap in time
            w.write_interval({"time": float(k), "queues": []}, evs[k:k + 1500], (), k // 100)
    with Recording(path) as rec:
        got = list(rec.events())
        assert sorted(got, key=lambda e: e.time_ns) == got
        assert sorted(got) == sorted(evs)
        lo, hi = evs[5000].time_ns, evs[12000].time_ns
        inside = [e for e in evs if lo <= e.time_ns < hi]
        assert sorted(rec.events(lo, hi)) == sorted(inside)
        assert list(rec.events(hi, lo)) == []

        def count(es):
            c = {}
            for e in es:
                c[e.device, e.queue, e.kind] = c.get((e.device, e.queue, e.kind), 0) + 1
            return c
        assert rec.event_counts() == count(evs)
        assert rec.event_counts(lo, hi) == count(inside)
        assert rec.event_counts(start_ns=lo) == count(e for e in evs if e.time_ns >= lo)
        assert rec.event_counts(end_ns=hi) == count(e for e in evs if e.time_ns < hi)
        assert rec.event_counts(hi, lo) == {}
        db = sqlite3.connect(path)
        assert db.execute("SELECT sum(count), sum(kicks), sum(calls) FROM event_blocks").fetchone() == (
            len(evs), sum(e.kind == "kick" for e in evs), sum(e.kind == "call" for e in evs))
        assert db.execute("SELECT max(events_lost) FROM snapshots").fetchone() == ((len(evs) - 1) // 1500 * 15,)
        db.execute("UPDATE event_blocks SET kind_counts = '{\"kick\": 1' WHERE id = 3")   # hostile file
        db.commit()
        db.close()
    with Recording(path) as rec, pytest.raises(RecordingError, match="kind_counts"):
        rec.event_counts()


def test_reader_errors(tmp_path) -> None:
    with pytest.raises(RecordingError, match="no such file"):
        Recording(str(tmp_path / "missing.vqs"))
    junk = tmp_path / "junk.vqs"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(RecordingError, match=r"junk.vqs: not a vqscope recording"):
        Recording(str(junk))
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(RecordingError, match=r"other.db: not a vqscope recording"):
        Recording(str(other))
    empty = str(tmp_path / "empty.vqs")
    RecordingWriter(empty, {}).close()
    with pytest.raises(RecordingError, match="empty recording"):
        Recording(empty)
    future = str(tmp_path / "future.vqs")
    with RecordingWriter(future, {}) as w:
        w.write_interval({"time": 1.0, "queues": []})
        w.set_header("schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(RecordingError, match=rf"future.vqs: unknown schema version {SCHEMA_VERSION + 1}"):
        Recording(future)
    with pytest.raises(Exception, match="exists"):
        RecordingWriter(future, {})
    with RecordingWriter(str(tmp_path / "one.vqs"), {}) as w:
        w.write_interval({"time": 1.0, "queues": []})
    with Recording(str(tmp_path / "one.vqs")) as rec:
        with pytest.raises(IndexError, match="out of range"):
            rec.snapshot(1)
        assert rec.snapshot(-1) == {"time": 1.0, "queues": []}


def test_hostile_recording_contents_are_recording_errors(tmp_path) -> None:
    """A recording is input too: a zlib bomb, JSON nested past the parser's
    depth, a truncated stream or a message entry that is not JSON each
    give a RecordingError naming the part, not a traceback or the memory."""
    import zlib

    from inspector.recording import codec

    path = str(tmp_path / "hostile.vqs")
    with RecordingWriter(path, {}) as w:
        for k in range(3):
            w.write_interval({"time": float(k), "queues": []}, [Event(10 + k, "net1", 0, "kick", 1)],
                             [{"time": float(k), "request": "GET_FEATURES"}])
    bomb = zlib.compress(b" " * (codec.MAX_INFLATED + 1), 9)
    assert len(bomb) < 1 << 20
    cases = [
        ("UPDATE snapshots SET data = ? WHERE idx = 0", bomb, "inflates beyond", lambda r: r.snapshot(0)),
        ("UPDATE snapshots SET data = ? WHERE idx = 0", zlib.compress(b"[" * 100000 + b"]" * 100000),
         "nested too deeply", lambda r: r.snapshot(0)),
        ("UPDATE snapshots SET data = ? WHERE idx = 0", zlib.compress(b'{"k": {}}')[:-3], "incomplete",
         lambda r: r.snapshot(0)),
        ("UPDATE event_blocks SET data = ? WHERE id = 1", bomb, "inflates beyond|holds", lambda r: list(r.events())),
        ("UPDATE event_blocks SET count = ? WHERE id = 1", -1, "count", lambda r: list(r.events())),
        ("UPDATE messages SET entry = ? WHERE id = 1", "{not json", "messages entry is not JSON",
         lambda r: r.messages()),
    ]
    for sql, value, why, read in cases:
        p = str(tmp_path / f"case{cases.index((sql, value, why, read))}.vqs")
        shutil.copy(path, p)
        db = sqlite3.connect(p)
        db.execute(sql, (value,))
        db.commit()
        db.close()
        with Recording(p) as rec, pytest.raises(RecordingError, match=why):
            read(rec)


def test_write_and_read_errors_are_two_inspector_errors() -> None:
    """RecordError: a recording that cannot be made (the recorder stops);
    RecordingError: a file that cannot be read as one (replay, export)."""
    from inspector.errors import InspectorError
    from inspector.record import DiskFullError, RecordError

    assert issubclass(RecordError, InspectorError) and issubclass(RecordingError, InspectorError)
    assert not issubclass(RecordError, RecordingError) and not issubclass(RecordingError, RecordError)
    assert issubclass(DiskFullError, RecordError)


def test_message_dedup_of_a_whole_log() -> None:
    d = MessageDedup()
    log = [{"time": 1.0, "request": "A"}, {"time": 2.0, "request": "B"}, {"time": 2.0, "request": "C"}]
    assert d.new(log) == log
    assert d.new(log) == []
    assert d.new(log[1:] + [{"time": 2.0, "request": "D"}, {"time": 3.0, "request": "E"}]) == [
        {"time": 2.0, "request": "D"}, {"time": 3.0, "request": "E"}]


# ----------------------------------------------------------------- real back-ends

HANDSHAKE = {"GET_FEATURES", "SET_FEATURES", "SET_OWNER", "SET_MEM_TABLE", "SET_VRING_NUM",
             "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL"}


class Demo:
    """`vqscope demo --headless` (our back-end + our front-end sending
    traffic) at a known socket, for as long as the test needs it."""

    def __init__(self, duration: float = 300.0, queues: int = 1):
        self.dir = socket_dir()
        self.sock = f"{self.dir}/d.sock"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.peer = Peer([*VQSCOPE, "demo", "--headless", "--split", "--duration", str(duration), "--queues", str(queues),
                          "--socket", self.sock], "vqscope demo", env=env, cwd=str(ROOT))
        try:
            wait_path(self.sock + ".introspect", 30, self.peer.alive)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.peer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_record(out: Path, connect: str, *extra: str, interval_ms: int = 50) -> subprocess.Popen:
    """`vqscope record` as a child; stderr to OUT.stderr."""
    err = open(str(out) + ".stderr", "w")
    try:
        return subprocess.Popen([*VQSCOPE, "record", "-o", str(out), "--connect", connect,
                                 "--interval", str(interval_ms), "--tee-jsonl", str(out) + ".tee", *extra],
                                cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()


def reap(p: subprocess.Popen) -> None:
    """Kill ``p`` if a failed assertion left it running."""
    if p.poll() is None:
        p.kill()
        p.wait()


def tee_lines(out: Path) -> list[dict]:
    p = Path(str(out) + ".tee")
    if not p.exists():
        return []
    text = p.read_text()
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def stderr_of(out: Path) -> str:
    return Path(str(out) + ".stderr").read_text()


def check_recording(out: Path, tee: list[dict]) -> Recording:
    """The replay equals the recorder's own copy, index for index."""
    rec = Recording(str(out))
    assert len(rec) == len(tee) and len(rec) > 0
    replay = list(rec.snapshots())
    for i, (a, b) in enumerate(zip(replay, tee)):
        assert a == b, f"snapshot {i} differs from what the recorder took"
    assert rec.snapshot(len(tee) // 2) == tee[len(tee) // 2]
    assert rec.snapshot_times() == [s["time"] for s in tee]
    return rec


@pytest.mark.timeout(120)
def test_record_demo_replays_exactly(tmp_path) -> None:
    with Demo() as demo:
        out = tmp_path / "demo.vqs"
        p = start_record(out, demo.sock, "--duration", "4")
        assert p.wait(60) == 0, stderr_of(out)
        last_live = json.loads(subprocess.run([*VQSCOPE, "snapshot", "--connect", demo.sock, "--json"],
                                              cwd=str(ROOT), capture_output=True, text=True, timeout=30).stdout)
    err = stderr_of(out)
    assert "duration reached" in err and "snapshots" in err, err
    tee = tee_lines(out)
    assert len(tee) >= 20  # 4 s at 50 ms, on a busy 2-core machine
    with check_recording(out, tee) as rec:
        h = rec.header
        assert h["source_kind"] == "backend" and h["interval_ms"] == 50
        assert h["kernel"] == os.uname().release and h["vqscope_version"]
        assert [(q["device"], q["index"]) for q in h["queues"]] == [
            (q["device"], q["index"]) for q in tee[0]["queues"]]
        # Traffic moved the rings while we recorded.
        first, last = tee[0]["queues"], tee[-1]["queues"]
        assert any(a["used_idx"] != b["used_idx"] for a, b in zip(first, last))
        assert last_live["queues"][1]["packets"] >= last[1]["packets"]
        msgs = rec.messages()
        assert HANDSHAKE <= {m["request"] for m in msgs}, [m["request"] for m in msgs]
        assert [m["time"] for m in msgs] == sorted(m["time"] for m in msgs)
        assert len(rec.messages(until=msgs[0]["time"])) >= 1
        db = sqlite3.connect(str(out))
        assert db.execute("SELECT count(*) FROM messages WHERE request = 'SET_MEM_TABLE' AND nfds >= 1").fetchone()[0] == 1
        assert db.execute("SELECT count(DISTINCT queue) FROM queue_samples").fetchone()[0] == len(last)
        db.close()
        if h["has_events"]:  # the back-end's event stream (introspection op "events")
            counts = rec.event_counts()
            kicks = sum(n for (d, q, k), n in counts.items() if k == "kick")
            calls = sum(n for (d, q, k), n in counts.items() if k == "call")
            assert kicks > 0 and calls > 0, counts
            # The back-end counts kicks/calls too; what was recorded between
            # the first and the last snapshot cannot exceed what it counted.
            k_delta = sum(b["kicks"] - a["kicks"] for a, b in zip(first, last))
            t0, t1 = round(tee[0]["time"] * 1e9), round(tee[-1]["time"] * 1e9)
            in_window = sum(n for (d, q, k), n in rec.event_counts(t0, t1).items() if k == "kick")
            assert 0 < in_window <= k_delta + 64, (in_window, k_delta)
            evs = list(rec.events())
            assert len(evs) == sum(counts.values())
            assert all(a.time_ns <= b.time_ns for a, b in zip(evs, evs[1:]))


@pytest.mark.timeout(120)
def test_record_sigkill_keeps_committed_intervals(tmp_path) -> None:
    with Demo() as demo:
        out = tmp_path / "killed.vqs"
        p = start_record(out, demo.sock, interval_ms=20)
        try:
            assert wait_for(lambda: len(tee_lines(out)) >= 40 or p.poll() is not None, 60), stderr_of(out)
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(10)
    assert p.returncode == -signal.SIGKILL
    tee = tee_lines(out)  # the tee is written after each commit: the file has at least these
    assert os.path.exists(str(out) + "-wal")  # killed: never checkpointed, the WAL holds the commits
    with Recording(str(out)) as rec:
        n = len(rec)
        assert len(tee) <= n <= len(tee) + 1
        for i, s in enumerate(rec.snapshots()):
            if i < len(tee):
                assert s == tee[i], f"snapshot {i}"
        assert rec.snapshot(n - 1)["time"] >= tee[-1]["time"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_record_signal_flushes_and_exits_0(tmp_path, sig) -> None:
    with Demo() as demo:
        out = tmp_path / "sig.vqs"
        p = start_record(out, demo.sock, interval_ms=1000)
        try:
            assert wait_for(lambda: len(tee_lines(out)) >= 2 or p.poll() is not None, 60), stderr_of(out)
            p.send_signal(sig)
            assert p.wait(30) == 0, stderr_of(out)
        finally:
            reap(p)
    err = stderr_of(out)
    assert f"{sig.name} after" in err, err
    assert not os.path.exists(str(out) + "-wal")  # closed: checkpointed
    tee = tee_lines(out)
    with check_recording(out, tee) as rec:
        assert len(rec) >= 3  # the last interval, written at the signal, is there too


@pytest.mark.timeout(120)
def test_record_source_gone_exits_1(tmp_path) -> None:
    demo = Demo()
    out = tmp_path / "gone.vqs"
    try:
        p = start_record(out, demo.sock)
        assert wait_for(lambda: len(tee_lines(out)) >= 5 or p.poll() is not None, 60), stderr_of(out)
    finally:
        demo.close()  # SIGTERM: the demo ends cleanly, its sockets go away
    try:
        assert p.wait(30) == 1, stderr_of(out)
    finally:
        reap(p)
    err = stderr_of(out)
    assert "source gone" in err, err
    check_recording(out, tee_lines(out)).close()


def test_record_unreachable_source_is_usage_error(tmp_path) -> None:
    r = subprocess.run([*VQSCOPE, "record", "-o", str(tmp_path / "x.vqs"), "--connect", str(tmp_path / "nope"),
                        "--duration", "1"], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot connect" in r.stderr, r.stderr
    assert not (tmp_path / "x.vqs").exists()
    r = subprocess.run([*VQSCOPE, "record", "-o", str(tmp_path / "x.vqs"), "--connect", "x", "--rotate"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--rotate goes with --max-size" in r.stderr
    r = subprocess.run([*VQSCOPE, "record", "-o", str(tmp_path / "x.vqs"), "--connect", "x", "--stall-after", "0"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--stall-after 0.0: give a positive number of seconds" in r.stderr, r.stderr


# ----------------------------------------------------------------- limits

class SyntheticSource(Source):
    """A source with a busy event stream (64 queues), for the size limits
    (in-process: the writer and the file system are real)."""

    name = "synthetic"
    has_events = True

    def __init__(self, events_per_poll: int = 20_000, queues: int = 64):
        self.n = events_per_poll
        self.queues = queues
        self.t = 1_700_000_000_000_000_000
        self.polls = 0
        self.rnd = random.Random(7)

    def snapshot(self) -> Snapshot:
        self.polls += 1
        return Snapshot(source=self.name, time=self.t / 1e9, queues=[
            QueueEntry(device=f"net{q // 2}", index=q % 2, size=256, features=0, event_idx=False,
                       avail_idx=self.polls * (q + 1) % 65536, used_idx=self.polls % 65536)
            for q in range(self.queues)])

    def events(self) -> list[Event]:
        out = []
        rnd, t = self.rnd, self.t
        for i in range(self.n):
            t += rnd.randint(50, 400)
            q = rnd.randrange(self.queues)
            out.append(Event(t, f"net{q // 2}", q % 2, "kick" if i & 1 else "call", i))
        self.t = t
        return out


class _Err:
    """A non-TTY stderr stand-in that keeps what was said."""

    def __init__(self):
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_max_size_stops(tmp_path) -> None:
    path = str(tmp_path / "cap.vqs")
    err = _Err()
    rc = Recorder(SyntheticSource(), path, interval=0.001, max_size=1_000_000, progress=err).run()
    assert rc == 0
    assert "reached --max-size 1 MB; stopping" in err.text, err.text
    with Recording(path) as rec:
        assert 1_000_000 <= os.path.getsize(path) < 2_000_000
        assert sum(rec.event_counts().values()) == 20_000 * len(rec)


def stop_after_polls(rec: Recorder, polls: int) -> None:
    """Make ``rec`` stop once its SyntheticSource was polled ``polls`` times."""
    src = rec.source
    orig = src.snapshot

    def snapshot():
        if src.polls >= polls:
            rec.stop.set()
        return orig()
    src.snapshot = snapshot


def test_max_size_rotates(tmp_path) -> None:
    path = str(tmp_path / "rot.vqs")
    err = _Err()
    rec = Recorder(SyntheticSource(), path, interval=0.001, max_size=400_000, rotate=True, progress=err,
                   duration=None)
    stop_after_polls(rec, 30)   # enough for three parts
    assert rec.run() == 0
    assert "continuing in " + path + ".1" in err.text
    parts = [path]
    while os.path.exists(f"{path}.{len(parts)}"):
        parts.append(f"{path}.{len(parts)}")
    assert len(parts) >= 3
    total, prev_end = 0, None
    for n, p in enumerate(parts):
        with Recording(p) as r:
            assert r.header["part"] == n
            assert r.header["previous_part"] == (os.path.basename(parts[n - 1]) if n else None)
            total += len(r)
            first = r.snapshot(0)["time"]
            assert prev_end is None or first > prev_end  # parts follow each other
            prev_end = r.snapshot(-1)["time"]
    assert total == rec.source.polls


TMPFS_KB = 1536


@pytest.fixture
def tiny_tmpfs(tmp_path):
    require(is_root(), "mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_KB}k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_readable(tiny_tmpfs) -> None:
    path = str(tiny_tmpfs / "full.vqs")
    err = _Err()
    rec = Recorder(SyntheticSource(), path, interval=0.001, progress=err)
    assert rec.run() == 1
    assert "disk full" in err.text and "stopped" in err.text, err.text
    with Recording(path) as r:  # in place, on the full file system
        n = len(r)
        assert n >= 5
        assert sum(r.event_counts().values()) == 20_000 * n
        assert r.snapshot(-1)["queues"][3]["avail_idx"] == n * 4 % 65536


# ----------------------------------------------------------------- DPDK

@pytest.mark.dpdk
@pytest.mark.timeout(300)
def test_record_testpmd(tmp_path) -> None:
    from tests.support.peers import DpdkTestpmd, VqscopeNet, find_testpmd, virtio_user_vdev

    require(is_root(), "DPDK's virtio_user needs root")
    require(find_testpmd() is not None, "dpdk-testpmd is not installed (Debian 'dpdk'; make deps)")
    d = socket_dir()
    sock = f"{d}/vu.sock"
    out = tmp_path / "testpmd.vqs"
    try:
        with VqscopeNet(sock) as be:
            p = start_record(out, sock, interval_ms=100)
            try:
                with DpdkTestpmd([virtio_user_vdev(sock)], main_lcore=1, name="testpmd") as fe:
                    fe.start(tx_first=4)
                    def moved() -> bool:  # 40 snapshots, and testpmd's frames in the last
                        tee = tee_lines(out)   # (a loaded machine can start it late)
                        return len(tee) >= 40 and len(tee[-1]["queues"]) > 1 and \
                            tee[-1]["queues"][1]["packets"] > 1000
                    assert wait_for(lambda: moved() or p.poll() is not None, 120)
                    fe.stop()
                assert wait_for(lambda: p.poll() is not None or len(tee_lines(out)) >= 45, 30)
                p.send_signal(signal.SIGINT)
                assert p.wait(30) == 0, stderr_of(out)
            finally:
                reap(p)
            be_tail = be.tail()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    tee = tee_lines(out)
    with check_recording(out, tee) as rec:
        reqs = [m["request"] for m in rec.messages()]
        assert HANDSHAKE <= set(reqs), (reqs, be_tail[-2000:])
        tx = [s["queues"][1]["packets"] for s in tee if len(s["queues"]) > 1]
        assert tx and tx[-1] > tx[0] and tx[-1] > 1000  # testpmd's frames moved while recorded
        if rec.header["has_events"]:
            counts = rec.event_counts()
            assert sum(n for (d_, q, k), n in counts.items() if k in ("kick", "call")) > 0


# ----------------------------------------------------------------- verdicts

@pytest.fixture(scope="module")
def demo_peer():
    """One `vqscope demo --headless` for the verdict tests (they only read it)."""
    with Demo() as d:
        yield d


class StallingAnalyzer(Analyzer):
    """The Analyzer as it is, except that every queue of index 1 is
    ``device_stalled`` from the 5th to the 9th snapshot it is given (since
    one second before the 5th; back to the real verdict at the 10th): a
    specific unhealthy verdict to store whatever the real rules make of the
    peer. Keeps every change it returned in ``returned``."""

    STALL = range(5, 10)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.n = 0
        self.mine: dict = {}
        self.returned: list[Diagnosis] = []

    def update(self, snap, events=()):
        super().update(snap, events)
        self.n += 1
        out = []
        for q in snap.queues:
            d = super().diagnosis(q.id)
            old = self.mine.get(q.id)
            if q.index == 1 and self.n in self.STALL:
                stalled = old is not None and old.verdict is Verdict.DEVICE_STALLED
                d = Diagnosis(q.device, q.index, Verdict.DEVICE_STALLED,
                              since=old.since if stalled else snap.time - 1.0,
                              evidence=f"fake: avail_idx {q.avail_idx} not taken", role="consume", time=snap.time)
            if d is not None and (old is None or old.verdict is not d.verdict):
                d = dataclasses.replace(d, time=snap.time)
                out.append(d)
                self.mine[q.id] = d
        self.returned.extend(out)
        return out

    def diagnosis(self, qid):
        return self.mine.get(qid)


def record_stalling(path: Path, sock: str, duration: float = 2.0) -> StallingAnalyzer:
    """`Recorder` in process against the back-end at ``sock`` with a
    StallingAnalyzer, 50 ms intervals; returns the analyzer."""
    with BackendSource(sock) as src:
        rec = Recorder(src, str(path), interval=0.05, duration=duration, progress=None,
                       analyzer_class=StallingAnalyzer)
        assert rec.run() == 0
    assert isinstance(rec.analyzer, StallingAnalyzer)
    return rec.analyzer


def check_timeline(changes: list[Diagnosis], snaps: list[dict]) -> None:
    """What any verdict timeline of the recording of ``snaps`` is: time
    ordered; each queue's first diagnosis at the first snapshot (for the
    queues there), each later one a change of verdict; made at snapshot
    times, since no later than made."""
    times = [s["time"] for s in snaps]
    assert changes and [d.time for d in changes] == sorted(d.time for d in changes)
    assert {d.time for d in changes} <= set(times)
    assert all(isinstance(d.verdict, Verdict) and d.since <= d.time for d in changes)
    last: dict = {}
    for d in changes:
        assert d.id not in last or last[d.id].verdict is not d.verdict, d
        last[d.id] = d
    firsts = [d.id for d in changes if d.time == times[0]]
    assert firsts == [(q["device"], q["index"]) for q in snaps[0]["queues"]]


@pytest.mark.timeout(120)
def test_record_stores_verdicts(tmp_path, demo_peer) -> None:
    """`vqscope record --stall-after` writes the Analyzer's changes to the
    verdicts table; the reader and replay give them back as Diagnoses."""
    out = tmp_path / "v.vqs"
    p = start_record(out, demo_peer.sock, "--duration", "2", "--stall-after", "1.5")
    assert p.wait(60) == 0, stderr_of(out)
    assert "verdict changes" in stderr_of(out)
    tee = tee_lines(out)
    with check_recording(out, tee) as rec:
        assert rec.schema_version == SCHEMA_VERSION == 2
        assert rec.header["analyzer"] == {**dataclasses.asdict(Thresholds(stall_s=1.5)),
                                          "notifications_seen": rec.header["has_events"]}
        db = sqlite3.connect(str(out))
        rows = db.execute("SELECT snap, time, device, queue, verdict, since, evidence, role FROM verdicts "
                          "ORDER BY time, id").fetchall()
        db.close()
        changes = rec.verdict_changes()
        assert [(d.time, d.device, d.index, d.verdict.value, d.since, d.evidence, d.role) for d in changes] == \
            [r[1:] for r in rows]
        assert all(t == tee[snap]["time"] for snap, t, *_ in rows)
        check_timeline(changes, tee)
    with ReplaySource(str(out)) as src:
        assert src.verdict_changes() == changes
        assert isinstance(src.recording, Recording)
        recomputed = src.verdict_changes(Thresholds(stall_s=0.5))  # thresholds given: computed from the file
        check_timeline(recomputed, tee)
        assert src.verdict_changes() == changes


def as_version_1(src: Path, dst: Path) -> None:
    """A copy of a recording as vqscope wrote it at schema version 1: the
    same file without what version 2 added (the verdicts table and
    header.analyzer)."""
    shutil.copy(src, dst)
    db = sqlite3.connect(dst)
    db.execute("DROP TABLE verdicts")
    db.execute("DELETE FROM header WHERE key = 'analyzer'")
    db.execute("UPDATE header SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()


@pytest.mark.timeout(120)
def test_version_1_recording_gets_computed_verdicts(tmp_path, demo_peer) -> None:
    """A version-1 recording has no verdicts table: the reader feeds its
    snapshots, each with the events since the one before, to
    verdict_timeline, as the recorder would have fed its Analyzer."""
    out = tmp_path / "v2.vqs"
    p = start_record(out, demo_peer.sock, "--duration", "2")
    assert p.wait(60) == 0, stderr_of(out)
    tee = tee_lines(out)
    v1 = tmp_path / "v1.vqs"
    as_version_1(out, v1)
    with Recording(str(v1)) as rec:
        assert rec.schema_version == 1 and "analyzer" not in rec.header
        frames = list(rec.frames())
        assert [to_json(s) for s, _ in frames] == tee
        bounds = [to_ns(s["time"]) for s in tee]
        assert [e for _, evs in frames for e in evs] == [e for e in rec.events() if e.time_ns <= bounds[-1]]
        for i, (_, evs) in enumerate(frames):
            assert all((i == 0 or bounds[i - 1] < e.time_ns) and e.time_ns <= bounds[i] for e in evs)
        if rec.header["has_events"]:
            assert sum(len(evs) for _, evs in frames) > 0
        changes = rec.verdict_changes()
        check_timeline(changes, tee)
        assert changes == verdict_timeline(frames, Thresholds(), notifications_seen=rec.header["has_events"])
        assert rec.verdict_changes() == changes
    with ReplaySource(str(v1)) as src:
        assert src.verdict_changes() == changes


@pytest.mark.timeout(120)
def test_recorder_stores_an_unhealthy_verdict(tmp_path, demo_peer) -> None:
    """What the recorder's Analyzer returns is what the file gives back,
    Diagnosis for Diagnosis: here a device_stalled with its evidence and a
    since earlier than the snapshot, then the way back."""
    out = tmp_path / "stall.vqs"
    a = record_stalling(out, demo_peer.sock)
    with Recording(str(out)) as rec:
        times = rec.snapshot_times()
        assert len(times) == a.n >= 12
        changes = rec.verdict_changes()
        assert changes == a.returned
        check_timeline(changes, list(rec.snapshots()))
        queues1 = [(q["device"], 1) for q in rec.snapshot(4)["queues"] if q["index"] == 1]
        stalls = [d for d in changes if d.verdict is Verdict.DEVICE_STALLED]
        assert [(d.id, d.time, d.since) for d in stalls] == [(k, times[4], times[4] - 1.0) for k in queues1]
        assert all(d.evidence.startswith("fake: avail_idx ") and d.severity is Severity.ERROR and
                   d.role == "consume" for d in stalls)
        back = [d for d in changes if d.index == 1 and d.time == times[9]]
        assert [d.id for d in back] == queues1 and not any(d.verdict is Verdict.DEVICE_STALLED for d in back)


def test_rotated_parts_restate_verdicts(tmp_path) -> None:
    """Each part of a rotated recording starts with every queue's verdict
    (its since kept); together, less those restatements, the parts hold
    exactly the Analyzer's changes."""
    path = str(tmp_path / "rot.vqs")
    rec = Recorder(SyntheticSource(queues=8), path, interval=0.001, max_size=300_000, rotate=True,
                   progress=None, analyzer_class=StallingAnalyzer)
    stop_after_polls(rec, 30)
    assert rec.run() == 0
    assert len(rec.paths) >= 3
    merged, last = [], {}
    for n, p in enumerate(rec.paths):
        with Recording(p) as r:
            t0 = r.snapshot_times()[0]
            changes = r.verdict_changes()
            first = [d for d in changes if d.time == t0]
            assert [d.id for d in first] == [(q["device"], q["index"]) for q in r.snapshot(0)["queues"]]
            for d in changes:
                prev = last.get(d.id)
                if n and d.time == t0 and prev is not None:   # a restatement, or a change at t0
                    if (prev.verdict, prev.since) == (d.verdict, d.since):
                        assert d.since <= prev.time < t0
                        continue
                merged.append(d)
                last[d.id] = d
    assert merged == rec.analyzer.returned
    assert any(d.verdict is Verdict.DEVICE_STALLED for d in merged)


class FailingAnalyzer(Analyzer):
    """The Analyzer, raising from its 4th snapshot on (a bug in a rule)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.n = 0

    def update(self, snap, events=()):
        self.n += 1
        if self.n >= 4:
            raise ZeroDivisionError("a rule divided by zero")
        return super().update(snap, events)


def test_analyzer_failure_keeps_the_recording(tmp_path) -> None:
    """An Analyzer that raises stops the verdicts, not the recording; the
    file then says it holds none (header.analyzer null) and readers compute
    them."""
    path = str(tmp_path / "fail.vqs")
    err = _Err()
    rec = Recorder(SyntheticSource(events_per_poll=100, queues=4), path, interval=0.001, duration=0.3,
                   progress=err, analyzer_class=FailingAnalyzer)
    assert rec.run() == 0
    assert "the analyzer failed (ZeroDivisionError: a rule divided by zero); recording goes on" in err.text
    assert rec.analyzer is None
    with Recording(path) as r:
        assert len(r) > 4 and r.header["analyzer"] is None
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM verdicts WHERE snap = 0").fetchone()[0] == 4  # one per queue
        assert db.execute("SELECT max(snap) FROM verdicts").fetchone()[0] <= 2  # none after the failure
        db.close()
        assert r.verdict_changes() == verdict_timeline(r.frames(), Thresholds(), True)


def test_verdict_rows_are_checked(tmp_path) -> None:
    """A verdicts row is input like any other: one that is not a diagnosis
    is a RecordingError naming the row and the field; the writer ties
    verdicts to a snapshot."""
    path = str(tmp_path / "v.vqs")
    snap = to_json(Snapshot(source="t", time=5.0, queues=[
        QueueEntry(device="net0", index=0, size=256, features=0, event_idx=False)]))
    d = Diagnosis("net0", 0, Verdict.KICK_MISSING, since=3.0, evidence="avail_idx 7, no kick", role="consume",
                  time=5.0)
    with RecordingWriter(path, {"analyzer": {"stall_s": 2.0}}) as w:
        with pytest.raises(Exception, match="verdicts without one"):
            w.write_interval(None, verdicts=[d])
        w.write_interval(snap, verdicts=[d])
    with Recording(path) as r:
        assert r.verdict_changes() == [d]
        assert r.verdict_changes(Thresholds()) != [d]   # thresholds given: computed, not the table
    for sql, why in [("UPDATE verdicts SET verdict = 'sick'", r"verdicts row 1.verdict is 'sick'"),
                     ("UPDATE verdicts SET since = 'soon'", r"verdicts row 1.since is 'soon'"),
                     ("DROP TABLE verdicts", "verdicts: no such table")]:
        p = str(tmp_path / "bad.vqs")
        shutil.copy(path, p)
        db = sqlite3.connect(p)
        db.execute(sql)
        db.commit()
        db.close()
        with Recording(p) as r, pytest.raises(RecordingError, match=why):
            r.verdict_changes()
        os.unlink(p)
