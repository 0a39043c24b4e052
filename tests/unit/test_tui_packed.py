"""The TUI on packed queues (VIRTIO 1.2 §2.8): the queue table's packed
positions (slot/wrap where split shows indices), the ring drawn from the
device's and the driver's positions, the event suppression both ways in
words, packed chains; a pytest-textual-snapshot of the packed queue screen."""

from __future__ import annotations

from inspector.analysis import Verdict
from inspector.snapshot.model import Chain, Descriptor, Snapshot
from inspector.spec.virtio import RING_EVENT_FLAGS_DESC as DESC
from inspector.spec.virtio import RING_EVENT_FLAGS_DISABLE as DISABLE
from inspector.spec.virtio import RING_EVENT_FLAGS_ENABLE as ENABLE
from inspector.spec.virtio import VIRTQ_DESC_F_AVAIL, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from tui import pictures, render
from tui.app import VqscopeApp

from tests.support.packed_queues import packed_entry

from .test_tui import FakeAnalyzer, ScriptedSource, _first_snapshot

T0 = 1_763_713_501.25
EVIDENCE = ("the device took 5 buffers (last_avail_idx slot 1 wrap 0) and returned none for 3.2 s "
            "(next_used slot 12 wrap 1, next_avail slot 4 wrap 0); 3 kicks received")


def packed_tx():
    """16 slots: the device returned up to slot 12 (wrap 1), read up to slot 1
    (wrap 0), the driver made slots up to 4 (wrap 0) available; calls wanted
    at slot 12 wrap 1, kicks at slot 1 wrap 0."""
    chains = [Chain(head=s, descs=(Descriptor(0x7f000 + 0x800 * s, 12, VIRTQ_DESC_F_AVAIL | VRING_DESC_F_NEXT, s),
                                   Descriptor(0x80000 + 0x800 * s, 1514, VIRTQ_DESC_F_AVAIL, s)),
                    out_bytes=1526, in_bytes=0, slot=2 * s - 1) for s in (1, 2)]
    return packed_entry(index=1, size=16, used=(12, 1), avail=(4, 0), last_avail=(1, 0),
                        driver_event=(DESC, 12, 1), device_event=(DESC, 1, 0), kicks=3, calls=12,
                        packets=40, bytes=60_000, chains=chains)


def packed_rx():
    return packed_entry(index=0, size=16, used=(3, 0), avail=(3, 1), last_avail=(3, 0),
                        driver_event=(ENABLE, 0, 1), device_event=(DISABLE, 0, 1), dropped=0,
                        chains=[Chain(head=7, descs=(Descriptor(0x90000, 1526, VIRTQ_DESC_F_AVAIL | VRING_DESC_F_WRITE,
                                                                7),), out_bytes=0, in_bytes=1526, slot=3)])


def test_queue_cells_show_packed_positions():
    cells = render.queue_cells(packed_tx())
    assert (cells["avail_idx"], cells["used_idx"], cells["last_avail_idx"], cells["inflight"]) == \
        ("4/0", "12/1", "1/0", "8")
    assert (cells["avail_flags"], cells["used_event"], cells["used_flags"], cells["avail_event"]) == \
        ("DESC", "12/1", "DESC", "1/0")
    rx = render.queue_cells(packed_rx())
    assert (rx["avail_flags"], rx["used_event"], rx["used_flags"], rx["avail_event"]) == \
        ("ENABLE", "—", "DISABLE", "—")
    fields = dict(render.queue_fields(packed_tx()))
    assert fields["next_avail"] == "4/0" and fields["driver_event"] == "DESC 12/1" and "avail_idx" not in fields
    assert render.chain_rows(packed_tx().chains[0])[0][:6] == ["id 1 @ slot 1", "0", "0x7f800", "12",
                                                                "NEXT|AVAIL", "id 1"]


def test_packed_ring_regions_across_the_wrap():
    r = pictures.packed_regions(packed_tx())
    # next_used 12/1 -> last_avail 1/0: slots 12..15, 0 held; 1..3 available; 4..11 used or free.
    assert (r.start, r.taken, r.unknown, r.available, r.free, r.notes) == (12, 5, 0, 3, 8, ())
    assert pictures.ring_bar(r, 16).plain == "█▓▓▓░░░░░░░░████"
    no_read = packed_tx()
    no_read.last_avail_idx = no_read.last_avail_wrap_counter = None
    r = pictures.packed_regions(no_read)
    assert (r.taken, r.unknown, r.available) == (0, 8, 0)


def test_packed_markers_and_notifications_in_words():
    marks = [t.plain for t in pictures.ring_markers(packed_tx(), 16)]
    assert any("last_avail/kick_at 1/0" in m for m in marks) and any("next_used/call_at 12/1" in m for m in marks)
    assert pictures.kick_text(packed_tx(), True).startswith("at slot 1 wrap 0: device event flags DESC")
    assert pictures.kick_text(packed_rx(), False) == ("disabled: device event flags DISABLE (the device polls, "
                                                      "or is busy); this source does not see kicks")
    assert pictures.call_text(packed_rx(), True).startswith("enabled: driver event flags ENABLE")


def packed_app() -> VqscopeApp:
    src = ScriptedSource(Snapshot(source="packed sample", time=T0, queues=[packed_rx(), packed_tx()]))
    src.has_events = True
    app = VqscopeApp(src)
    app.analyzer = FakeAnalyzer({("net0", 1): (Verdict.DEVICE_STALLED, EVIDENCE), ("net0", 0): (Verdict.IDLE, "")})
    return app


def test_snapshot_packed_queue_table(snap_compare):
    """Main screen: net0 q1 (packed TX) device_stalled first with 4/0, 12/1, 1/0 under avail_idx, used_idx,
    last_avail_idx; q0 (packed RX) idle with ENABLE/DISABLE under the flag columns."""
    assert snap_compare(packed_app(), terminal_size=(200, 30), run_before=_first_snapshot)


def test_snapshot_packed_queue_screen(snap_compare):
    """Queue screen of net0 q1: the packed descriptor ring (5 held █ from slot 12 round to 0, 3 available ▓,
    8 used or free ░; markers next_used/call_at 12/1, last_avail/kick_at 1/0, next_avail 4/0), kicks and
    calls as DESC at slot/wrap in words, the verdict, the packed fields and chains (id @ slot)."""
    assert snap_compare(packed_app(), terminal_size=(160, 44), run_before=_first_snapshot, press=["enter"])
