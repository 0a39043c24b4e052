"""Benchmark: the recorder's sustained write rate.

Events: a synthetic stream like a busy 32-pair virtio-net device — 64
queues, kicks on TX queues (value 1) and calls on all (value: the queue's
used_idx), ns times increasing with jitter, queues interleaved at random —
written through the real RecordingWriter into a real file, one
transaction per interval of 50 000 events (a 100 ms interval at 500 000
events/s). Only write_interval is timed (the stream is generated between
calls). Then the file is read back: every event must be there.

Snapshots: 64 queues of 256 entries as the back-end reports them (RX queues
with ~200 posted single-buffer chains whose window moves on each snapshot,
TX queues a few 2-descriptor chains), each snapshot written alone.

Serving: the back-end's cost per event of the ``events`` op as JSON and as
binary records, side by side (``serve_ratio``: JSON / binary), and the
client's cost of turning either into Events.

Prints ONE JSON line:
{"bench": "record", "events_per_s": events / time in write_interval,
 "events_per_cpu_s": events / CPU time in write_interval (the same, less
 what other processes took of the shared cores), "events": total, "bytes_per_event": (file size after close − size of the
 same file without events) / events, "lost_events": events written − events
 read back, "snapshots_per_s_64q": snapshots / time in write_interval,
 "snapshot_bytes": file bytes per snapshot, "serve_json_ns_per_event",
 "serve_binary_ns_per_event", "serve_ratio", "client_json_ns_per_event",
 "client_binary_ns_per_event", "goal_met": events_per_s >=
 500000 and bytes_per_event <= 16 and lost_events == 0}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inspector.events import Event  # noqa: E402
from inspector.record import Recording, RecordingWriter  # noqa: E402

QUEUES = 64
INTERVAL_EVENTS = 50_000
INTERVALS = 40
SNAPSHOTS = 300


def event_batches(rnd: random.Random):
    t = time.time_ns()
    used = [0] * QUEUES
    devices = [f"net{q // 2}" for q in range(QUEUES)]
    for _ in range(INTERVALS):
        batch = []
        for _ in range(INTERVAL_EVENTS):
            t += rnd.randint(500, 3500)  # ~500 kev/s with jitter
            q = rnd.randrange(QUEUES)
            if q & 1 and rnd.random() < 0.5:
                batch.append(Event(t, devices[q], q & 1, "kick", 1))
            else:
                used[q] = (used[q] + rnd.randint(1, 32)) & 0xFFFF
                batch.append(Event(t, devices[q], q & 1, "call", used[q]))
        yield batch


def bench_events(d: str) -> dict:
    rnd = random.Random(1)
    path = os.path.join(d, "events.vqs")
    base = os.path.join(d, "base.vqs")
    snap = {"source": "bench", "time": time.time(), "queues": []}
    spent = cpu = 0.0
    n = 0
    with RecordingWriter(path, {"source": "bench"}) as w, RecordingWriter(base, {"source": "bench"}) as wb:
        for i, batch in enumerate(event_batches(rnd)):
            s = dict(snap, time=snap["time"] + 0.1 * i)
            t0, c0 = time.perf_counter(), time.process_time()
            w.write_interval(s, batch, (), 0)
            spent += time.perf_counter() - t0
            cpu += time.process_time() - c0
            n += len(batch)
            wb.write_interval(s, (), (), 0)  # the same file without events
    size, base_size = os.path.getsize(path), os.path.getsize(base)
    with Recording(path) as rec:
        read = sum(rec.event_counts().values())
        decoded = sum(1 for _ in rec.events())
    return {"events_per_s": round(n / spent), "events_per_cpu_s": round(n / cpu), "events": n,
            "bytes_per_event": round((size - base_size) / n, 2),
            "lost_events": n - min(read, decoded)}


def chain(head: int, descs: int, addr: int) -> dict:
    ds = [{"addr": addr + 4096 * k, "len": 12 if k == 0 and descs > 1 else 1536, "flags": 1 if k < descs - 1 else 2,
           "next": (head + k + 1) % 256} for k in range(descs)]
    return {"head": head, "descs": ds, "out_bytes": 0 if descs == 1 else 1526, "in_bytes": 1536 if descs == 1 else 0}


def snapshots(rnd: random.Random):
    avail = [0] * QUEUES
    used = [0] * QUEUES
    t = time.time()
    for i in range(SNAPSHOTS):
        queues = []
        for q in range(QUEUES):
            rx = q % 2 == 0
            avail[q] = (avail[q] + rnd.randint(0, 40)) & 0xFFFF
            inflight = 200 if rx else rnd.randint(0, 4)
            used[q] = (avail[q] - inflight) & 0xFFFF
            chains = [chain((used[q] + k) % 256, 1 if rx else 2, 0x10000000 * q + 4096 * ((used[q] + k) % 256))
                      for k in range(inflight)]
            queues.append({"device": f"net{q // 2}", "index": q % 2, "layout": "split", "size": 256,
                           "features": 5905580035, "event_idx": True, "avail_idx": avail[q], "used_idx": used[q],
                           "last_avail_idx": used[q] if rx else avail[q], "inflight": inflight,
                           "avail_flags": 0, "used_flags": 1, "used_event": used[q], "avail_event": avail[q],
                           "kicks": avail[q] // 8, "calls": used[q] // 4, "calls_suppressed": 0,
                           "packets": used[q], "bytes": used[q] * 1514, "chains": chains, "anomalies": []})
        yield {"source": "bench", "time": t + 0.1 * i, "queues": queues}


def bench_snapshots(d: str) -> dict:
    path = os.path.join(d, "snaps.vqs")
    spent = 0.0
    with RecordingWriter(path, {"source": "bench"}) as w:
        for s in snapshots(random.Random(2)):
            t0 = time.perf_counter()
            w.write_interval(s)
            spent += time.perf_counter() - t0
    with Recording(path) as rec:
        assert len(rec) == SNAPSHOTS
    return {"snapshots_per_s_64q": round(SNAPSHOTS / spent, 1),
            "snapshot_bytes": round(os.path.getsize(path) / SNAPSHOTS)}


def bench_serve() -> dict:
    """The back-end's side of a recorder: serving the ``events`` op from a
    full central buffer (64 queues, 2^18 events) in 65536-event replies,
    as JSON and as binary records, alternated in one run (best of 5 each);
    and the client's side, turning each reply into Events."""
    from inspector.introspect.buffer import EventBuffer
    from inspector.introspect.client import decode_binary_events
    from inspector.events import encode_events

    rnd = random.Random(7)
    buf = EventBuffer()
    t = 1_700_000_000_000_000_000
    total = 1 << 18
    for k in range(total // 256):
        q = rnd.randrange(QUEUES)
        buf.add("net1", q, encode_events([(t + 64 * k + i, "call" if q % 2 == 0 else "kick", i)
                                           for i in range(256)]))

    def serve(binary: bool) -> tuple[float, list]:
        replies, since, t0 = [], 0, time.perf_counter()
        while since < buf.next_seq:
            r = buf.read(since, 65536, binary=binary)
            if binary:
                header, records = r
                replies.append(json.dumps(header).encode() + b"\n" + records)
                since = header["next"]
            else:
                replies.append(json.dumps(r).encode() + b"\n")
                since = r["next"]
        return time.perf_counter() - t0, replies

    def client(binary: bool, replies: list) -> float:
        n, t0 = 0, time.perf_counter()
        for raw in replies:
            line, _, rest = raw.partition(b"\n")
            reply = json.loads(line)
            if binary:
                reply["records"] = rest
                n += len(decode_binary_events(reply["records"], reply["chunks"], "bench"))
            else:
                n += len([Event(*e) for e in reply["events"]])
        assert n == total, n
        return time.perf_counter() - t0

    best = {False: [float("inf"), float("inf")], True: [float("inf"), float("inf")]}
    for _ in range(5):
        for binary in (False, True):
            spent, replies = serve(binary)
            best[binary][0] = min(best[binary][0], spent)
            best[binary][1] = min(best[binary][1], client(binary, replies))
    ns = {b: [1e9 * x / total for x in v] for b, v in best.items()}
    return {"serve_json_ns_per_event": round(ns[False][0], 1), "serve_binary_ns_per_event": round(ns[True][0], 1),
            "serve_ratio": round(ns[False][0] / ns[True][0], 1),
            "client_json_ns_per_event": round(ns[False][1], 1),
            "client_binary_ns_per_event": round(ns[True][1], 1)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-record-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        res = {"bench": "record", **bench_events(d), **bench_snapshots(d), **bench_serve()}
    res["goal_met"] = (res["events_per_s"] >= 500_000 and res["bytes_per_event"] <= 16
                       and res["lost_events"] == 0)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
