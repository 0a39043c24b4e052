"""The doctor on block queues (VIRTIO 1.2 §5.2.6): bad-request counters of
the back-end (``extras["blk"]``) that grow while watched are
``bad_requests`` naming the driver (each kind, its meaning and the status it
got); ``io_error`` growth is ``io_error`` naming the backing store; counters
already there when watching began, or that do not move, say nothing; a
stalled ring is said first."""

from __future__ import annotations

from inspector.analysis import Analyzer, Severity, Thresholds, Verdict
from inspector.analysis.rules import BLK_BAD_MEANING, BLK_IO_ERROR
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.tools.doctor import VERDICT_HELP

from .test_tui_blk import KINDS

T0 = 1_700_000_000.0


def blk_entry(avail=10, used=10, **bad: int) -> QueueEntry:
    """blk0 queue 0 with the back-end's counters, ``bad`` kinds counted."""
    counts = {k: bad.get(k, 0) for k in KINDS}
    return QueueEntry(device="blk0", index=0, size=128, features=0, event_idx=False, device_type="block",
                      avail_idx=avail, used_idx=used, last_avail_idx=used, inflight=(avail - used) & 0xFFFF,
                      kicks=avail, calls=used,
                      extras={"blk": {"requests": {}, "status": {}, "bad_requests": counts, "in_flight": 0,
                                      "resubmitted": 0, "bytes_read": 0, "bytes_written": 0, "recent": []}})


def run(states, dt=0.5):
    a = Analyzer(Thresholds(stall_s=2.0), notifications_seen=True)
    changes = []
    for i, q in enumerate(states):
        changes += a.update(Snapshot(source="t", time=T0 + i * dt, queues=[q]))
    return a, changes


def test_every_kind_of_the_back_end_has_a_meaning():
    assert set(BLK_BAD_MEANING) | {BLK_IO_ERROR} == set(KINDS)


def test_bad_requests_that_grow_name_the_driver_kinds_and_statuses():
    a, changes = run([blk_entry(header_short=2), blk_entry(header_short=2),
                      blk_entry(12, 12, header_short=5, unsupported=1), blk_entry(14, 14, header_short=5, unsupported=1)])
    d = a.diagnosis(("blk0", 0))
    assert d.verdict is Verdict.BAD_REQUESTS and d.severity is Severity.WARNING
    assert d.since == T0 + 1.0
    assert d.evidence == ("the driver sent 4 malformed requests since watching began: header_short 3 (header "
                          "shorter than 16 bytes: IOERR); unsupported 1 (unknown request type: UNSUPP)")
    assert [c.verdict for c in changes] == [Verdict.IDLE, Verdict.BAD_REQUESTS]


def test_counts_from_before_the_watch_say_nothing():
    a, _ = run([blk_entry(out_of_range=7), blk_entry(12, 12, out_of_range=7)])
    assert a.diagnosis(("blk0", 0)).verdict is Verdict.HEALTHY


def test_io_error_growth_names_the_backing_store():
    a, _ = run([blk_entry(), blk_entry(11, 11, io_error=2, unaligned=1)])
    d = a.diagnosis(("blk0", 0))
    assert d.verdict is Verdict.IO_ERROR and d.severity is Severity.ERROR
    assert "2 requests failed in the device's host I/O" in d.evidence and "backing store" in d.evidence
    assert d.evidence.endswith("the driver also sent 1 malformed")


def test_a_back_end_restart_resets_the_base():
    a, _ = run([blk_entry(header_short=4), blk_entry(11, 11), blk_entry(12, 12)])
    assert a.diagnosis(("blk0", 0)).verdict is Verdict.HEALTHY
    a, _ = run([blk_entry(header_short=4), blk_entry(11, 11), blk_entry(12, 12, header_short=1)])
    assert a.diagnosis(("blk0", 0)).verdict is Verdict.BAD_REQUESTS


def test_a_stalled_ring_is_said_first():
    # 5 requests outstanding, used_idx still for 3 s, kicked: device_stalled, whatever the counters say.
    states = [blk_entry(15, 10)] + [blk_entry(15, 10, header_short=1)] * 7
    a, _ = run(states)
    assert a.diagnosis(("blk0", 0)).verdict is Verdict.DEVICE_STALLED


def test_hostile_extras_are_ignored():
    q = blk_entry()
    q.extras["blk"]["bad_requests"] = {"header_short": "many", 3: 4}
    r = blk_entry(11, 11)
    r.extras["blk"] = ["not", "a", "dict"]
    a, _ = run([q, r, blk_entry(12, 12)])
    assert a.diagnosis(("blk0", 0)).verdict is Verdict.HEALTHY


def test_doctor_help_lists_the_new_verdicts():
    assert "bad_requests" in VERDICT_HELP and "io_error" in VERDICT_HELP
