"""Benchmark: C decoder vs the pure-Python reference on a full ring.

Ring of size 1024 with every avail slot in flight (last_avail_idx = used_idx
= 0, avail_idx = 1024). 1024 distinct 2-descriptor chains do not fit a
1024-entry table, so n chains fill it (90 % 2-descriptor chains, 10 %
indirect with a 4-entry table: 1.9·n ≤ 1024) and avail slot i names chain
i mod n. Both decoders return an inspector.ring.snapshot.RingSnapshot (header
ints, rings, descriptors and chains as integer columns, anomalies as
Anomaly tuples); nothing per chain or descriptor is built until asked for.
Prints ONE JSON line:
{"bench": "decoder", "c_us", "python_us", "copy_us", "ratio",
 "c_as_dict_us", "python_as_dict_us", "model_us", "model_ratio", "json_us",
 "json_ratio", "chains_us"} — medians of rounds measured side by side
(interleaved). c_us / python_us: snapshot_split producing a RingSnapshot;
ratio = python_us / c_us; copy_us is a plain bytes copy (GuestMemory.read) of
the ring areas and the indirect tables; *_as_dict_us: snapshot_split followed
by as_dict() (the ~3000 dicts and lists of the plain-data view), so nothing
is hidden. From a RingSnapshot already decoded: model_us builds the queue's
inspector.snapshot.model.QueueEntry (fill_from_ring: the chains stay
columns), json_us turns a Snapshot of that queue into the Snapshot JSON
dicts (codec.to_json: what the introspection reply, --json and the recorder
do), chains_us builds its typed Chain/Descriptor tuples (what reading
QueueEntry.chains costs, once); *_ratio is that time over c_us.

A second line on stderr splits c_us into the C walk (decoder._walk: argument
checks, region table, vqd_snapshot) and the wrapping (column copies into bytes
and the RingSnapshot).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inspector.ring import decoder, reference  # noqa: E402
from inspector.snapshot import QueueEntry, Snapshot, to_json  # noqa: E402
from tests.support.ringbuilder import RingBuilder  # noqa: E402

SIZE = 1024
ROUNDS = 41


def build() -> tuple[RingBuilder, list[int]]:
    rb = RingBuilder(SIZE, data_mem=4 << 20)
    n = 0
    while True:  # largest n with 2·(n − n//10) + n//10 ≤ SIZE
        m = n + 1
        if 2 * (m - m // 10) + m // 10 > SIZE:
            break
        n = m
    heads = []
    buf = rb.data_gpa + 0x10000
    for k in range(n):
        if k % 10 == 9:
            heads.append(rb.add_indirect_chain([(buf, 64, False), (buf + 64, 1500, True),
                                                (buf + 1600, 512, True), (buf + 2200, 16, True)]))
        else:
            heads.append(rb.add_chain([(buf, 12, False), (buf + 64, 1514, True)]))
        buf += 4096
    for slot in range(SIZE):
        rb.set_head(slot, heads[slot % n])
    rb.ring.set_avail_idx(SIZE)
    return rb, heads


def timed(fn, inner: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return (time.perf_counter_ns() - t0) / inner / 1000.0


def main() -> None:
    rb, heads = build()
    desc, avail, used = rb.addrs
    mem = rb.mem
    tables = [(rb.tables[h], 16 * rb.table_entries[h]) for h in heads if h in rb.tables]

    def c():
        return decoder.snapshot_split(mem, SIZE, desc, avail, used, 0)

    def py():
        return reference.snapshot_split(mem, SIZE, desc, avail, used, 0)

    def c_dict():
        return c().as_dict()

    def py_dict():
        return py().as_dict()

    def copy():
        out = [mem.read(desc, 16 * SIZE), mem.read(avail, 6 + 2 * SIZE),
               mem.read(used, 6 + 8 * SIZE)]
        out += [mem.read(a, n) for a, n in tables]
        return out

    def walk():
        return decoder._walk(mem, SIZE, desc, avail, used, 0, decoder.DEFAULT_MAX_DESCS)

    ring = c()  # decoded once: the model and the JSON are timed from it

    def model():
        return QueueEntry(device="net0", index=1, size=SIZE, features=0, event_idx=False).fill_from_ring(ring)

    snap = Snapshot(source="bench", time=0.0, queues=[model()])

    def json_dicts():
        return to_json(snap)

    def chains():
        ring._chains = None  # what the first read of QueueEntry.chains builds (then cached)
        return ring.chains

    s = c()
    assert s == py(), "C and Python disagree (columns)"
    assert c_dict() == py_dict(), "C and Python disagree (as_dict)"
    assert s.n_chains == SIZE and not s.anomalies
    assert json_dicts()["queues"][0]["chains"] == s.as_dict()["chains"] and model().n_chains == SIZE
    assert ring._chains is None and len(chains()) == SIZE  # nothing above built a Chain
    # (function, calls per timing): about 1 ms or more per timing
    runs = {"c": (c, 50), "py": (py, 1), "copy": (copy, 50), "walk": (walk, 50),
            "c_dict": (c_dict, 2), "py_dict": (py_dict, 1),
            "model": (model, 2000), "json": (json_dicts, 2), "chains": (chains, 2)}
    for fn, _ in runs.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(ROUNDS):
        for k, (fn, inner) in runs.items():
            samples[k].append(timed(fn, inner))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(json.dumps({"bench": "decoder", "c_us": round(med["c"], 1),
                      "python_us": round(med["py"], 1), "copy_us": round(med["copy"], 1),
                      "ratio": round(med["py"] / med["c"], 1),
                      "c_as_dict_us": round(med["c_dict"], 1),
                      "python_as_dict_us": round(med["py_dict"], 1),
                      "model_us": round(med["model"], 2), "model_ratio": round(med["model"] / med["c"], 3),
                      "json_us": round(med["json"], 1), "json_ratio": round(med["json"] / med["c"], 1),
                      "chains_us": round(med["chains"], 1)}))
    print(json.dumps({"c_walk_us": round(med["walk"], 1),
                      "c_wrap_us": round(med["c"] - med["walk"], 1),
                      "as_dict_ratio": round(med["py_dict"] / med["c_dict"], 1)}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
