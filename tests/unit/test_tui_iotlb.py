"""The TUI's IOTLB panel (tui/render_iotlb.py, tui/widgets/iotlb_panel.py):
a queue behind an IOMMU shows its ring IOVAs with their translations, the
IOTLB's counters and the miss the device waits for; other queues do not
show the panel."""

from __future__ import annotations

import asyncio
import subprocess

from inspector.analysis import Verdict
from inspector.snapshot import codec
from inspector.snapshot.model import QueueEntry, Snapshot
from tui import render_iotlb
from tui.app import VqscopeApp
from tui.widgets.iotlb_panel import IotlbPanel

from tests.conftest import ROOT, VQSCOPE

from .test_tui import FakeAnalyzer, ScriptedSource, _first_snapshot, wait_for

T0 = 1_700_000_000.0

IOTLB = {"entries": 14, "capacity": 16384, "updates": 40, "invalidations": 26, "invalidations_unmapped": 1,
         "evictions": 0, "misses": 41, "rejected": 2, "ring_restarts": 0, "ring_refused": None,
         "buffers_untranslated": 230,
         "ring": {"desc": {"iova": 0xFFFFC000, "uaddr": 0x7F0000004000, "gpa": 0x32A84000},
                  "avail": {"iova": 0xFFFFD000, "uaddr": None, "gpa": None},
                  "used": {"iova": 0xFFFFD240, "uaddr": 0x7F0000005240, "gpa": None}},
         "miss": {"iova": 0xFFFEE000, "perm": "wo", "waiting_s": 2.5}}


def queue(extras: dict | None) -> QueueEntry:
    return QueueEntry(device="net1", index=0, size=256, features=0, event_idx=True, avail_idx=256, used_idx=9,
                      last_avail_idx=9, inflight=247, device_type="net", extras=extras or {})


def test_rows_say_where_each_ring_area_lands_and_what_the_device_waits_for():
    rows = dict((label, str(text)) for label, text in render_iotlb.iotlb_rows(IOTLB))
    assert rows["IOVA rings"] == ("desc 0xffffc000 → gpa 0x32a84000  avail 0xffffd000 → not in the IOTLB  "
                                  "used 0xffffd240 → uaddr 0x7f0000005240")
    assert "entries 14" in rows["IOTLB"] and "misses 41" in rows["IOTLB"] and "rejected 2" in rows["IOTLB"]
    assert "buffers untranslated 230" in rows["IOTLB"]
    assert rows["waits for"] == "the translation of IOVA 0xfffee000 (wo) for 2.5 s"
    assert "refused" not in rows
    refused = dict(render_iotlb.iotlb_rows(dict(IOTLB, miss=None, ring_refused="vring 0: used ring needs wo")))
    assert "waits for" not in refused and str(refused["refused"]) == "vring 0: used ring needs wo"
    assert render_iotlb.iotlb_stats(queue(None)) is None and render_iotlb.iotlb_stats(None) is None


def test_vqscope_snapshot_prints_one_line_per_iova_queue(tmp_path):
    path = tmp_path / "iova.json"
    path.write_text(codec.dumps(Snapshot(source="iova sample", time=T0,
                                         queues=[queue({"iotlb": IOTLB}), queue(None)])))
    out = subprocess.run(VQSCOPE + ["snapshot", "--file", str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "IOVA rings" in ln]
    assert len(lines) == 1 and "net1 q0: IOVA rings desc 0xffffc000 → gpa 0x32a84000" in lines[0]
    assert "waits for the translation of IOVA 0xfffee000 (wo)" in " ".join(out.stdout.split())   # wrapped


def _app(extras: dict | None) -> VqscopeApp:
    src = ScriptedSource(Snapshot(source="iotlb sample", time=T0, queues=[queue(extras)]))
    app = VqscopeApp(src)
    app.analyzer = FakeAnalyzer({("net1", 0): (Verdict.HEALTHY, "")})
    return app


def _panel_shown(extras: dict | None) -> bool:
    app = _app(extras)
    shown = []

    async def run():
        async with app.run_test(size=(160, 50)) as pilot:
            await _first_snapshot(pilot)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.screen.query(IotlbPanel))
            shown.append(app.screen.query_one(IotlbPanel).display)
    asyncio.run(run())
    return shown[0]


def test_queue_screen_shows_the_panel_only_behind_an_iommu():
    assert _panel_shown({"iotlb": IOTLB}) is True
    assert _panel_shown(None) is False
