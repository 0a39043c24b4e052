"""Recordings of block queues: the back-end's counters (``extras["blk"]``)
and each in-flight chain's virtio-blk ``request`` survive record → replay
(the writer's deltas and keyframes, the reader, ReplaySource) and both
exports; the doctor finds the bad_requests verdict in the recording
(Recording.verdict_changes)."""

from __future__ import annotations

import copy
import json
from contextlib import closing

import pytest

from inspector.analysis import Analyzer, Verdict
from inspector.record import Recording, RecordingWriter
from inspector.record.export import write_chrome_trace, write_jsonl
from inspector.ring.blk_request import BlkRequest
from inspector.snapshot.codec import to_json
from inspector.snapshot.model import Snapshot
from inspector.sources.replay import ReplaySource

from .test_export import check_trace
from .test_tui_blk import blk_queue

T0 = 1_700_000_000.0


def snapshots(n: int = 10) -> list[Snapshot]:
    """blk0 q0 whose counters move (a bad request every third snapshot) with
    three decoded requests in flight."""
    base = blk_queue()
    out = []
    for i in range(n):
        q = copy.copy(base)
        q.extras = copy.deepcopy(base.extras)
        blk = q.extras["blk"]
        blk["requests"]["in"] += i
        blk["bad_requests"]["header_short"] = i // 3
        blk["recent"] = blk["recent"][i % 3:]
        q.kicks, q.calls = base.kicks + i, base.calls + i
        out.append(Snapshot(source="synthetic", time=T0 + 0.5 * (i + 1), queues=[q]))
    return out


@pytest.fixture
def recorded(tmp_path) -> tuple[str, list[Snapshot]]:
    """A recording of :func:`snapshots` (keyframe every 4) with the
    analyzer's verdicts: its path and the snapshots."""
    path, snaps = str(tmp_path / "b.vqs"), snapshots()
    analyzer = Analyzer(notifications_seen=True)
    with RecordingWriter(path, {"start_time": T0, "source": "synthetic"}, keyframe_every=4) as w:
        for s in snaps:
            w.write_interval(to_json(s), verdicts=analyzer.update(s))
    return path, snaps


def test_a_recording_of_a_block_queue_replays_equal(recorded):
    path, snaps = recorded
    with Recording(path) as rec:
        assert [rec.snapshot(i) for i in range(len(rec))] == [to_json(s) for s in snaps]
    with closing(ReplaySource(path)) as src:
        for i in reversed(range(len(snaps))):     # seeks back through keyframes and deltas
            src.seek(i)
            got, want = src.snapshot().queues[0], snaps[i].queues[0]
            assert got.extras == want.extras and got.chains == want.chains
            assert got.chains[0].request == BlkRequest("out", 2048, 4096)


def test_the_bad_requests_verdict_is_recorded(recorded):
    with Recording(recorded[0]) as rec:
        verdicts = [d.verdict for d in rec.verdict_changes()]
    assert Verdict.BAD_REQUESTS in verdicts


def test_exports_keep_requests_and_counters(recorded, tmp_path):
    path, snaps = recorded
    jl = tmp_path / "b.jsonl"
    with Recording(path) as rec, open(jl, "w") as f:
        write_jsonl(rec, f)
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    got = [x["snapshot"] for x in lines if x["type"] == "snapshot"]
    assert got == [to_json(s) for s in snaps]
    assert got[-1]["queues"][0]["chains"][1]["request"] == {"type": "in", "sector": 8, "data_len": 512,
                                                            "status": "pending"}
    assert got[-1]["queues"][0]["blk"]["bad_requests"]["header_short"] == 3
    out = tmp_path / "b.json"
    with Recording(path) as rec, open(out, "w") as f:
        write_chrome_trace(rec, f)
    check_trace(json.loads(out.read_text()))
