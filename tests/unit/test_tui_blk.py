"""The TUI and ``vqscope snapshot`` on a block queue (VIRTIO 1.2 §5.2): each
in-flight chain's request in the chain view, the blk panel of the back-end's
counters (bad requests by kind, non-zero ones highlighted; recent
completions with their status), the one-line summary of the text snapshot,
and a pytest-textual-snapshot of the block queue screen.

The queue is built as a source would: real virtio-blk requests written by
the driver-side ring in guest memory, decoded (inspector.ring.blk_request),
then through the Snapshot JSON; its ``extras["blk"]`` built by hand in the
shape of the back-end's counters (BRIEF shared interface 2)."""

from __future__ import annotations

import json
import subprocess
import struct

from inspector.analysis import Verdict
from inspector.memory import GuestMemory
from inspector.ring import decoder
from inspector.ring.blk_request import attach_requests, memory_reader
from inspector.ring.driver import DriverRing
from inspector.snapshot import codec
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.spec.virtio import (VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_F_VERSION_1,
                                   VIRTIO_RING_F_EVENT_IDX)
from tui import render, render_blk
from tui.app import VqscopeApp
from tui.widgets.blk_panel import BlkPanel
from tui.widgets.chain_table import ChainTable

from tests.conftest import ROOT, VQSCOPE

from .test_tui import FakeAnalyzer, ScriptedSource, _first_snapshot, wait_for

T0 = 1_763_713_501.25
SIZE = 16
RING, DATA = 0x10000, 0x100000
KINDS = ("header_short", "status_missing", "status_not_writable", "data_not_writable", "data_not_readable",
         "out_of_range", "sector_overflow", "unaligned", "too_many_segments", "segment_too_large", "read_only",
         "unsupported", "get_id_short", "discard_over_limit", "write_zeroes_over_limit", "discard_bad_segment",
         "io_error")


def blk_extras(**bad: int) -> dict:
    """``extras["blk"]`` as the back-end reports it, ``bad`` kinds counted."""
    recent = [{"head": h, "type": t, "sector": s, "data_len": n, "status": st, "bad": b}
              for h, t, s, n, st, b in [(3, "in", 0, 4096, "ok", None), (4, "out", 8, 4096, "ok", None),
                                        (5, "flush", 0, 0, "ok", None),
                                        (6, "out", 1 << 40, 512, "ioerr", "out_of_range"),
                                        (7, 99, 0, 0, "unsupp", "unsupported")]]
    return {"blk": {"requests": {"in": 120, "out": 64, "flush": 3, "get_id": 1, "discard": 0, "write_zeroes": 0,
                                 "other": 1},
                    "status": {"ok": 187, "ioerr": 1, "unsupp": 1},
                    "bad_requests": {k: bad.get(k, 0) for k in KINDS},
                    "in_flight": 2, "resubmitted": 0, "bytes_read": 491520, "bytes_written": 262144,
                    "recent": recent}}


def blk_queue(extras: bool = True) -> QueueEntry:
    """blk0 queue 0: three requests in flight (OUT 4096 B at sector 2048, IN
    512 B at sector 8 through an indirect table, a FLUSH), decoded from the
    guest memory the driver wrote, then through the Snapshot JSON."""
    mem = GuestMemory()
    mem.add(RING, bytearray(0x8000))
    data = bytearray(0x10000)
    mem.add(DATA, data)
    ring = DriverRing(mem, RING, SIZE)
    cursor = [DATA]

    def buf(content: bytes | int) -> int:
        n = content if isinstance(content, int) else len(content)
        gpa = cursor[0]
        cursor[0] += (n + 15) & ~15
        if not isinstance(content, int):
            data[gpa - DATA:gpa - DATA + n] = content
        return gpa

    def hdr(t, sector):
        return buf(struct.pack("<IIQ", t, 0, sector))

    ring.add_chain([(hdr(VIRTIO_BLK_T_OUT, 2048), 16, False), (buf(4096), 4096, False), (buf(1), 1, True)])
    ring.add_indirect_chain(buf(48), [(hdr(VIRTIO_BLK_T_IN, 8), 16, False), (buf(512), 512, True),
                                      (buf(1), 1, True)])
    ring.add_chain([(hdr(VIRTIO_BLK_T_FLUSH, 0), 16, False), (buf(1), 1, True)])
    ring.publish()
    dec = decoder.snapshot_split(mem, SIZE, ring.desc_addr, ring.avail_addr, ring.used_addr, 0)
    attach_requests(dec, memory_reader(mem))
    q = QueueEntry(device="blk0", index=0, size=SIZE, features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX,
                   event_idx=True, device_type="block", kicks=40, calls=38, packets=189, bytes=753664,
                   extras=blk_extras(out_of_range=1, unsupported=1) if extras else None).fill_from_ring(dec)
    return codec.queue_from_json(json.loads(json.dumps(codec.queue_to_json(q))))


def test_chain_rows_show_each_request():
    chains = blk_queue().chains
    rows = [render.chain_rows(c, blk=True) for c in chains]
    assert [r[0][-1] for r in rows] == ["out 4096 B @ sector 2048 · pending", "in 512 B @ sector 8 · pending",
                                        "flush · pending"]
    assert all(row[-1] == "" for r in rows for row in r[1:])
    assert len(render.chain_rows(chains[0])[0]) == len(render.CHAIN_COLUMNS)   # a net queue's table: unchanged


def test_request_text_of_odd_requests():
    assert render.request_text(None, None, None, "pending", "header: 12 device-readable bytes ...") == \
        "malformed: header: 12 device-readable bytes ... · pending"
    assert render.request_text(99, 7, 512, "unsupp", "unsupported") == "99 512 B @ sector 7 · unsupp (unsupported)"
    assert render.request_text("get_id", 0, 20, "ok") == "get_id 20 B · ok"


def test_blk_rows_highlight_bad_requests_and_errors():
    rows = dict(render_blk.blk_rows(blk_queue().extras["blk"]))
    bad = rows["bad"]
    assert "out_of_range 1" in bad.plain and "header_short 0" in bad.plain
    highlighted = {bad.plain[s.start:s.end] for s in bad.spans if s.style == render.ANOMALY_STYLE}
    assert highlighted == {"out_of_range 1", "unsupported 1"}
    status = rows["status"]
    assert {status.plain[s.start:s.end] for s in status.spans if s.style} == {"ioerr 1", "unsupp 1"}
    assert rows["in flight"] == "2 · resubmitted 0 · read 491520 B · written 262144 B"
    recent = [t for label, t in render_blk.blk_rows(blk_queue().extras["blk"]) if label in ("recent", "")]
    assert recent[-1].plain == "head 7: 99 @ sector 0 · unsupp (unsupported)" and recent[-1].style == render.ANOMALY_STYLE


def test_blk_rows_survive_a_hostile_peer():
    """extras come from a peer's JSON: wrong shapes show as nothing, never raise."""
    rows = render_blk.blk_rows({"requests": [1], "status": None, "bad_requests": {"x": "y"}, "in_flight": "3",
                            "recent": [5, {"head": 1}]})
    assert dict(rows)["in flight"].startswith("0 ·") and len(rows) == 5


def test_blk_summary_line():
    line = render_blk.blk_summary(blk_queue()).plain
    assert line.startswith("blk0 q0: requests in 120  out 64  flush 3  get_id 1  other 1 · status ok 187")
    assert "bad out_of_range 1  unsupported 1 · in flight 2 · pending out 1  in 1  flush 1" in line
    assert render_blk.blk_summary(blk_queue(extras=False)).plain == "blk0 q0: pending out 1  in 1  flush 1"
    net = QueueEntry(device="net0", index=0, size=8, features=0, event_idx=False)
    assert render_blk.blk_summary(net) is None


def test_vqscope_snapshot_text_shows_block_queues(tmp_path):
    path = tmp_path / "blk.json"
    path.write_text(codec.dumps(Snapshot(source="blk sample", time=T0, queues=[blk_queue()])))
    out = subprocess.run(VQSCOPE + ["snapshot", "--file", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "blk0 q0: requests in 120" in out.stdout and "pending out 1  in 1  flush 1" in out.stdout


def blk_app() -> VqscopeApp:
    src = ScriptedSource(Snapshot(source="blk sample", time=T0, queues=[blk_queue()]))
    src.has_events = True
    app = VqscopeApp(src)
    app.analyzer = FakeAnalyzer({("blk0", 0): (Verdict.HEALTHY, "")})
    return app


def test_queue_screen_of_a_block_queue_shows_requests_and_counters():
    app = blk_app()

    async def body(pilot):
        await _first_snapshot(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.query(ChainTable) and app.screen.query_one(ChainTable).row_count)
        table = app.screen.query_one(ChainTable)
        assert table.get_row_at(0)[-1] == "out 4096 B @ sector 2048 · pending"
        panel = app.screen.query_one(BlkPanel)
        assert panel.display

    async def run():
        async with app.run_test(size=(160, 50)) as pilot:
            await body(pilot)
    import asyncio
    asyncio.run(run())


def test_snapshot_block_queue_screen(snap_compare):
    """Queue screen of blk0 q0: the blk panel (requests by type; status with ioerr 1 and unsupp 1
    highlighted; bad requests, out_of_range 1 and unsupported 1 highlighted; in flight, bytes; the
    last 5 completions, the two bad ones highlighted) and the chain table with a request column:
    out 4096 B @ sector 2048, in 512 B @ sector 8 (indirect), flush, all pending."""
    assert snap_compare(blk_app(), terminal_size=(160, 50), run_before=_first_snapshot, press=["enter"])
