"""Recordings of packed queues (VIRTIO 1.2 §2.8): the split-only fields are
null there, the packed ones carry the ring. A recording replays equal
(snapshot JSON round trip through the writer's deltas and the reader), its
queue_samples follow the packed positions, and both exports run, the
chrome trace's counters being the packed slots."""

from __future__ import annotations

import json
import sqlite3

from inspector.record import Recording, RecordingWriter
from inspector.record.export import write_chrome_trace, write_jsonl
from inspector.snapshot.codec import to_json
from inspector.snapshot.model import Chain, Descriptor, Snapshot
from inspector.sources.replay import ReplaySource
from inspector.spec.virtio import RING_EVENT_FLAGS_DESC, VIRTQ_DESC_F_AVAIL, VRING_DESC_F_NEXT

from tests.support.packed_queues import packed_entry

from .test_export import check_trace

T0 = 1_700_000_000.0
SIZE = 8


def snapshots(n: int = 12) -> list[Snapshot]:
    """A packed TX queue moving round the ring (wrap counters toggling) with
    one chain listed, and an idle RX queue without its device positions."""
    out = []
    for i in range(n):
        c_used, c_avail = 3 * i, 3 * i + 2     # counters: slot + size * (1 - wrap), mod 2 * size
        pos = [(c % SIZE, 1 - (c // SIZE) % 2) for c in (c_used, c_avail)]
        chain = Chain(head=i % SIZE, descs=(Descriptor(0x1000 + i, 64, VIRTQ_DESC_F_AVAIL | VRING_DESC_F_NEXT, i % SIZE),
                                            Descriptor(0x2000 + i, 1500, VIRTQ_DESC_F_AVAIL, i % SIZE)),
                      out_bytes=1564, in_bytes=0, slot=pos[0][0])
        tx = packed_entry(index=1, size=SIZE, used=pos[0], avail=pos[1], last_avail=pos[0], kicks=i, calls=i,
                          driver_event=(RING_EVENT_FLAGS_DESC, pos[0][0], pos[0][1]), chains=[chain])
        rx = packed_entry(index=0, size=SIZE, positions="flags")
        out.append(Snapshot(source="synthetic", time=T0 + 0.1 * (i + 1), queues=[rx, tx]))
    return out


def record(path: str, snaps: list[Snapshot], keyframe_every: int = 4) -> None:
    with RecordingWriter(path, {"start_time": T0, "source": "synthetic"}, keyframe_every=keyframe_every) as w:
        for s in snaps:
            w.write_interval(to_json(s))


def test_a_recording_of_packed_queues_replays_equal(tmp_path):
    path = str(tmp_path / "p.vqs")
    snaps = snapshots()
    record(path, snaps)
    with Recording(path) as rec:
        assert [rec.snapshot(i) for i in range(len(rec))] == [to_json(s) for s in snaps]
        assert [q["layout"] for q in rec.header["queues"]] == ["packed", "packed"]
    src = ReplaySource(path)
    try:
        for i, s in enumerate(snaps):
            src.seek(i)
            got = src.snapshot()
            assert got.queues == s.queues and got.queues[1].chains[0].slot == s.queues[1].chains[0].slot
            assert got.queues[1].avail_idx is None and got.queues[1].next_avail == s.queues[1].next_avail
    finally:
        src.close()


def test_queue_samples_follow_the_packed_positions(tmp_path):
    path = str(tmp_path / "p.vqs")
    snaps = snapshots()
    # kicks and calls still: only the positions move.
    for s in snaps:
        s.queues[1].kicks = s.queues[1].calls = 0
    record(path, snaps)
    db = sqlite3.connect(path)
    rows = db.execute("SELECT snap, avail_idx, used_idx, last_avail_idx, inflight FROM queue_samples "
                      "WHERE queue = 1 ORDER BY snap").fetchall()
    assert [r[0] for r in rows] == list(range(len(snaps)))       # a row each time the ring moved
    assert all(r[1] is None and r[2] is None and r[4] == 2 for r in rows)  # null split indices
    assert len(db.execute("SELECT * FROM queue_samples WHERE queue = 0").fetchall()) == 1


def test_exports_of_packed_queues(tmp_path):
    path = str(tmp_path / "p.vqs")
    record(path, snapshots())
    out = tmp_path / "p.json"
    with Recording(path) as rec, open(out, "w") as f:
        write_chrome_trace(rec, f)
    evs = check_trace(json.loads(out.read_text()))
    counters = [e for e in evs if e["ph"] == "C" and e["name"] == "queue 1"]
    assert counters[0]["args"] == {"inflight": 2, "next_avail": 2, "next_used": 0}
    assert counters[3]["args"] == {"inflight": 2, "next_avail": 3, "next_used": 1}   # past the ring's end
    jl = tmp_path / "p.jsonl"
    with Recording(path) as rec, open(jl, "w") as f:
        write_jsonl(rec, f)
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    snap = next(x for x in lines if x["type"] == "snapshot")["snapshot"]
    assert snap["queues"][1]["next_avail"] == 2 and snap["queues"][1]["avail_idx"] is None
