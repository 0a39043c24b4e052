"""The doctor's rules on sequences of queue states (inspector.analysis).

The states here are the numbers a source reports; the real faults that
produce them (serve --inject, the built-in front-end's faults, QEMU, testpmd,
vhost-net) are in tests/integration/test_doctor.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inspector.analysis import (Analyzer, Diagnosis, Role, Severity, Thresholds, Verdict, diagnosis_from_json,
                                diagnosis_to_json, role_of, verdict_timeline)
from inspector.errors import SnapshotFormatError
from inspector.events import Event
from inspector.ring.anomalies import Anomaly, AnomalyKind
from inspector.snapshot.model import QueueEntry, Snapshot
from inspector.spec.virtio import VRING_USED_F_NO_NOTIFY, vring_need_event

T0 = 1_700_000_000.0
TH = Thresholds(stall_s=2.0)


def entry(index=1, size=256, event_idx=True, device_type="net", **kw) -> QueueEntry:
    kw.setdefault("used_event", kw.get("used_idx", 0) if event_idx else None)
    if not event_idx:
        kw["used_event"] = None
    kw.setdefault("avail_event", kw.get("last_avail_idx") or kw.get("used_idx", 0) if event_idx else None)
    kw["inflight"] = (kw.get("avail_idx", 0) - kw.get("used_idx", 0)) & 0xFFFF
    return QueueEntry(device="net0", index=index, size=size, features=0, event_idx=event_idx,
                      device_type=device_type, **kw)


def run(states, seen=True, th=TH, dt=0.5, events=None):
    """Feed ``states`` (QueueEntry or list of them per snapshot) at ``dt``
    intervals; returns the analyzer and every change."""
    a = Analyzer(th, notifications_seen=seen)
    changes = []
    for i, s in enumerate(states):
        qs = s if isinstance(s, list) else [s]
        evs = (events or {}).get(i, ())
        changes += a.update(Snapshot(source="t", time=T0 + i * dt, queues=qs), evs)
    return a, changes


def verdict(a: Analyzer, index=1) -> Diagnosis:
    return a.diagnosis(("net0", index))


# --- notification arithmetic ---------------------------------------------------------

@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0x7FFF))
def test_vring_need_event_is_membership_in_the_published_range(event, old, n):
    """vring_need_event(e, new, old) holds iff e is one of the n indices
    old, old+1 ... new-1 (mod 2^16) that the move published (§2.7.10)."""
    new = (old + n) & 0xFFFF
    published = {(old + k) & 0xFFFF for k in range(n)} if n < 64 else None
    expected = (event in published) if published is not None else ((event - old) & 0xFFFF) < n
    assert vring_need_event(event, new, old) is expected


def test_vring_need_event_boundaries():
    assert vring_need_event(5, 6, 5)          # the entry at index 5 was published
    assert not vring_need_event(6, 6, 5)      # 6 is not published yet
    assert not vring_need_event(4, 6, 5)      # 4 was before
    assert vring_need_event(0xFFFF, 0, 0xFFFE)  # across the 16-bit wrap
    assert vring_need_event(0, 1, 0xFFFF)
    assert not vring_need_event(3, 7, 7)      # nothing published


# --- roles -------------------------------------------------------------------------------

def test_roles_from_the_device_type():
    assert role_of("net", 0) is Role.FILL and role_of("net", 1) is Role.CONSUME
    assert role_of("net", 2, num_queues=3) is Role.CONSUME      # controlq last
    assert role_of("virtio-net", 4, num_queues=6) is Role.FILL
    assert role_of("virtio-blk", 0) is Role.CONSUME
    assert role_of("virtio-serial", 2) is Role.FILL and role_of("virtio-serial", 3) is Role.CONSUME
    assert role_of("scsi", 1) is Role.FILL and role_of("scsi", 2) is Role.CONSUME
    assert role_of("virtio-9p", 0) is Role.CONSUME and role_of("rng", 0) is Role.FILL
    assert role_of(None, 0) is Role.UNKNOWN and role_of("tpm-thing", 0) is Role.UNKNOWN


# --- healthy / idle ----------------------------------------------------------------------

def test_moving_queue_is_healthy_then_idle():
    states = [entry(avail_idx=i * 4, used_idx=i * 4, last_avail_idx=i * 4, kicks=i, calls=i) for i in range(6)]
    a, _ = run(states)
    assert verdict(a).verdict is Verdict.HEALTHY
    rest = states + [states[-1]] * 12      # 6 s still
    a, changes = run(rest)
    assert verdict(a).verdict is Verdict.IDLE
    assert [c.verdict for c in changes] == [Verdict.IDLE, Verdict.HEALTHY, Verdict.IDLE]


def test_rx_buffers_waiting_are_idle_not_stalled():
    rx = entry(index=0, avail_idx=256, used_idx=0, last_avail_idx=0, shadow_avail_idx=256, kicks=1)
    a, _ = run([rx] * 20)
    assert verdict(a, 0).verdict is Verdict.IDLE
    assert verdict(a, 0).role == "fill"


def test_busy_queue_with_buffers_outstanding_is_healthy():
    """used_idx moves every snapshot while buffers stay outstanding: the
    device keeps up."""
    states = [entry(avail_idx=100 + 10 * i, used_idx=90 + 10 * i, last_avail_idx=100 + 10 * i,
                    shadow_avail_idx=100 + 10 * i, kicks=i) for i in range(20)]
    a, changes = run(states)
    assert all(c.verdict in (Verdict.HEALTHY, Verdict.IDLE) for c in changes)


# --- device side ---------------------------------------------------------------------------

def test_device_stalled_after_threshold_then_clears():
    ok = entry(avail_idx=10, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, kicks=5)
    stuck = entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=14, kicks=6)
    moving = [entry(avail_idx=14 + i, used_idx=14 + i, last_avail_idx=14 + i, shadow_avail_idx=14 + i,
                    kicks=6 + i) for i in range(1, 4)]
    a, changes = run([ok, stuck, stuck, stuck, stuck])
    assert verdict(a).verdict is Verdict.HEALTHY          # 1.5 s: under the threshold
    a, changes = run([ok, stuck, stuck, stuck, stuck, stuck, stuck] + moving)
    kinds = [c.verdict for c in changes]
    assert Verdict.DEVICE_STALLED in kinds and kinds[-1] is Verdict.HEALTHY
    stalled = next(c for c in changes if c.verdict is Verdict.DEVICE_STALLED)
    assert stalled.since == T0 + 0.5                       # when the entries appeared
    assert "4 buffers available" in stalled.evidence and "read avail_idx 14" in stalled.evidence
    assert "1 kicks received" in stalled.evidence
    assert stalled.severity is Severity.ERROR


def test_device_took_but_returned_none():
    states = [entry(avail_idx=8, used_idx=8, last_avail_idx=8)] + \
             [entry(avail_idx=12, used_idx=8, last_avail_idx=12, shadow_avail_idx=12, kicks=1)] * 6
    a, _ = run(states)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED and "took 4 buffers" in d.evidence


def test_kick_missing_when_the_device_asked_for_one():
    """EVENT_IDX: the device set avail_event = 10 (its shadow); the driver
    published 10..13, crossing it; no kick came and the device never read."""
    base = entry(avail_idx=10, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=7)
    waiting = entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=7)
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.KICK_MISSING, d
    assert "4 entries published past shadow_avail_idx 10" in d.evidence and "avail_event 10" in d.evidence


def test_uncounted_notifications_cannot_make_kick_missing():
    """The same state from a snapshot that says its kicks are not counted
    (a proxy without --count-notifications): 0 kicks proves nothing, so
    the device owes progress (device_stalled), not the driver a kick."""
    base = entry(avail_idx=10, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=0)
    waiting = entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=0)
    a = Analyzer(TH, notifications_seen=True)
    for i, q in enumerate([base] + [waiting] * 6):
        a.update(Snapshot(source="t", time=T0 + i * 0.5, queues=[q], extras={"notifications_counted": False}))
    d = verdict(a)
    assert d.verdict is not Verdict.KICK_MISSING and not d.ok, d


def test_kicked_device_that_did_not_look_is_stalled_not_kick_missing():
    base = entry(avail_idx=10, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=7)
    waiting = entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=10, avail_event=10, kicks=8)
    a, _ = run([base] + [waiting] * 6)
    assert verdict(a).verdict is Verdict.DEVICE_STALLED


def test_kick_cannot_be_told_without_notification_counters():
    base = entry(avail_idx=10, used_idx=10, shadow_avail_idx=10, avail_event=10)
    waiting = entry(avail_idx=14, used_idx=10, shadow_avail_idx=10, avail_event=10)
    a, _ = run([base] + [waiting] * 6, seen=False)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED and "cannot tell" in d.evidence


def test_no_notify_left_set_is_suppression_stuck():
    base = entry(event_idx=False, avail_idx=10, used_idx=10, last_avail_idx=10, shadow_avail_idx=10,
                 used_flags=VRING_USED_F_NO_NOTIFY)
    waiting = entry(event_idx=False, avail_idx=12, used_idx=10, last_avail_idx=10, shadow_avail_idx=10,
                    used_flags=VRING_USED_F_NO_NOTIFY)
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.SUPPRESSION_STUCK and "VRING_USED_F_NO_NOTIFY" in d.evidence


def test_stale_avail_event_is_suppression_stuck():
    """The device read up to 20 but left avail_event at 12: the driver's
    publications 20..23 cross nothing, so no kick was owed (Cloud
    Hypervisor's stale-event-index hang)."""
    base = entry(avail_idx=20, used_idx=20, last_avail_idx=20, shadow_avail_idx=20, avail_event=12)
    waiting = entry(avail_idx=24, used_idx=20, last_avail_idx=20, shadow_avail_idx=20, avail_event=12)
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.SUPPRESSION_STUCK and "avail_event 12" in d.evidence


def test_kick_missing_across_the_16_bit_wrap():
    base = entry(avail_idx=0xFFFE, used_idx=0xFFFE, last_avail_idx=0xFFFE, shadow_avail_idx=0xFFFE,
                 avail_event=0xFFFE, kicks=3)
    waiting = entry(avail_idx=2, used_idx=0xFFFE, last_avail_idx=0xFFFE, shadow_avail_idx=0xFFFE,
                    avail_event=0xFFFE, kicks=3)
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.KICK_MISSING and "4 entries" in d.evidence


def test_unknown_role_is_not_judged_on_the_device_side():
    states = [entry(device_type=None, avail_idx=14, used_idx=10, shadow_avail_idx=14, kicks=1)] * 10
    a, _ = run(states)
    assert verdict(a).ok


# --- driver side ---------------------------------------------------------------------------

def rx(used, avail, used_event, calls=0, dropped=None, **kw):
    return entry(index=0, avail_idx=avail, used_idx=used, last_avail_idx=kw.pop("last_avail_idx", used),
                 used_event=used_event, calls=calls, dropped=dropped, **kw)


def test_call_missing_when_used_passed_used_event_and_no_call():
    states = [rx(100, 356, 100, calls=40)] + [rx(112, 356, 100, calls=40)] * 6
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.CALL_MISSING, d
    assert "used_idx 112 passed used_event 100 by 12" in d.evidence and "none sent" in d.evidence


def test_driver_stalled_when_calls_were_sent():
    states = [rx(100, 356, 100, calls=40)] + [rx(112, 356, 100, calls=41)] * 6
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.DRIVER_STALLED and "1 calls sent, driver did not respond" in d.evidence


def test_call_events_tell_whether_the_call_was_sent_before_watching():
    """State present from the first snapshot: the back-end's event log says
    the last call went out at used_idx 90, before used passed used_event
    100: call_missing; at 105: the call was sent."""
    stuck = [rx(112, 356, 100, calls=41)] * 7
    a, _ = run(stuck, events={0: [Event(0, "net0", 0, "call", 90)]})
    assert verdict(a, 0).verdict is Verdict.CALL_MISSING
    a, _ = run(stuck, events={0: [Event(0, "net0", 0, "call", 105)]})
    assert verdict(a, 0).verdict is Verdict.DRIVER_STALLED


def test_driver_refilling_is_not_stalled():
    states = [rx(100 + i, 356 + i, 99 + i, calls=40 + i) for i in range(10)]
    a, changes = run(states)
    assert all(c.ok for c in changes)


def test_used_event_zero_is_linux_disabling_callbacks_not_a_request():
    states = [rx(30, 286, 0, calls=3)] * 10
    a, _ = run(states)
    assert verdict(a, 0).ok


def test_used_event_far_behind_is_not_a_due_call():
    states = [rx(5000, 5256, 100, calls=3)] * 10
    a, _ = run(states)
    assert verdict(a, 0).ok


# --- starved -----------------------------------------------------------------------------

def test_starved_rx_with_drops():
    states = [rx(300, 300, 300, calls=9, dropped=0)] + [rx(300, 300, 300, calls=9, dropped=5 * i)
                                                        for i in range(1, 8)]
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.STARVED and "frames were dropped" in d.evidence
    assert d.severity is Severity.WARNING


def test_starved_after_the_device_filled_the_last_buffer():
    states = [rx(290, 300, 290, calls=9)] + [rx(300, 300, 300, calls=10)] * 7
    a, _ = run(states)
    assert verdict(a, 0).verdict is Verdict.STARVED


def test_empty_rx_never_filled_is_not_starved():
    states = [rx(0, 0, 0)] * 10
    a, _ = run(states)
    assert verdict(a, 0).verdict is Verdict.IDLE


# --- broken ------------------------------------------------------------------------------

def test_queue_broken_is_immediate_decoder_anomalies_need_two_snapshots():
    broken = entry(avail_idx=3, used_idx=3, anomalies=[Anomaly(AnomalyKind.QUEUE_BROKEN, "loop at head 2")])
    a, _ = run([broken])
    assert verdict(a).verdict is Verdict.RING_BROKEN and "loop at head 2" in verdict(a).evidence
    torn = entry(avail_idx=3, used_idx=3, anomalies=[Anomaly(AnomalyKind.HEAD_OUT_OF_RANGE, "head 999")])
    clean = entry(avail_idx=3, used_idx=3)
    a, _ = run([clean, torn, clean, torn, clean])
    assert verdict(a).ok
    a, _ = run([clean, torn, torn])
    assert verdict(a).verdict is Verdict.RING_BROKEN
    zero = entry(avail_idx=3, used_idx=3, anomalies=[Anomaly(AnomalyKind.ZERO_LEN, "len 0")])
    a, _ = run([zero] * 4)
    assert verdict(a).ok


def test_layout_mismatch_from_qemu_addresses():
    q = entry(avail_idx=3, used_idx=3, size=8,
              extras={"qemu": {"path": "/x", "vhost": False, "desc": 0x1000, "avail": 0x1080,
                               "used": 0x1080 + 4 + 16}})
    a, _ = run([q])
    d = verdict(a)
    assert d.verdict is Verdict.LAYOUT_MISMATCH and "legacy formula" in d.evidence
    q.extras["qemu"]["used"] = 0x1080 + 6 + 16
    a, _ = run([q])
    assert verdict(a).ok


# --- JSON, timeline ------------------------------------------------------------------------

def test_diagnosis_json_round_trip_and_errors():
    d = Diagnosis("net0", 1, Verdict.KICK_MISSING, T0, "4 entries ...", "consume", T0 + 3)
    obj = diagnosis_to_json(d)
    assert obj["severity"] == "error" and diagnosis_from_json(obj) == d
    with pytest.raises(SnapshotFormatError, match="verdict"):
        diagnosis_from_json(dict(obj, verdict="sad"))
    with pytest.raises(SnapshotFormatError, match="index"):
        diagnosis_from_json(dict(obj, index="1"))


def test_verdict_timeline_and_forgotten_queues():
    stuck = entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=14, kicks=6)
    frames = [(Snapshot("t", T0 + i * 0.5, [stuck]), ()) for i in range(8)]
    tl = verdict_timeline(frames, TH, notifications_seen=True)
    assert [d.verdict for d in tl] == [Verdict.IDLE, Verdict.DEVICE_STALLED]
    a = Analyzer(TH)
    a.update(Snapshot("t", T0, [stuck]))
    a.update(Snapshot("t", T0 + 1, []))
    assert a.diagnoses == {}


def test_rx_with_buffers_and_drops_but_nothing_filled_is_device_stalled():
    """The device drops frames for an RX queue that has 200 buffers posted
    (serve --inject stall=0): the device side, not the driver."""
    states = [rx(100, 300, 100, calls=9, dropped=0, shadow_avail_idx=300)] + \
             [rx(100, 300, 100, calls=9, dropped=4 * i, shadow_avail_idx=300) for i in range(1, 8)]
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.DEVICE_STALLED and "200 buffers posted" in d.evidence
    assert "28 frames for this queue were dropped" in d.evidence
    quiet = [rx(100, 300, 100, calls=9, dropped=0)] * 8          # no data: idle
    a, _ = run(quiet)
    assert verdict(a, 0).verdict is Verdict.IDLE


def test_tx_used_entries_left_uncollected_stall_nothing_until_the_ring_is_full():
    """Linux reclaims TX buffers at its next send (virtio_console, virtio_net
    without napi_tx): used past used_event on a TX queue with free
    descriptors is no verdict; with all `size` of them out it is."""
    lazy = [entry(avail_idx=140, used_idx=140, last_avail_idx=140, used_event=100, calls=3)] * 10
    a, _ = run(lazy)
    assert verdict(a).ok
    full = [entry(avail_idx=356, used_idx=356, last_avail_idx=356, used_event=100, calls=3)] * 10
    a, _ = run(full)
    d = verdict(a)        # present from the first snapshot, no call events: whether a call came is unknown
    assert d.verdict is Verdict.DRIVER_STALLED and "cannot be told" in d.evidence


def test_avail_event_tells_a_vhost_queue_read_its_entries():
    """No shadow_avail_idx (QEMU's vhost queues): a device that re-armed
    kicks at avail_event 23 read up to 23, so 19..22 waiting is the device's."""
    base = entry(avail_idx=19, used_idx=19, avail_event=19)
    stuck = entry(avail_idx=23, used_idx=19, avail_event=23)
    a, _ = run([base] + [stuck] * 6, seen=False)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED and "read avail_idx 23 (its avail_event)" in d.evidence


def test_a_device_waiting_for_an_unanswered_iotlb_miss_says_so():
    # vqscope's back-end behind an IOMMU: the device read avail_idx, could not translate the next
    # buffer and asked the front-end, which has not answered: device_stalled, with the reason
    miss = Anomaly(AnomalyKind.IOTLB_MISS_UNANSWERED,
                   "waiting 2.5 s for the translation of IOVA 0xfffee000 (ro): the back-end sent an IOTLB miss "
                   "(vhost-user BACKEND_IOTLB_MSG) the front-end has not answered")
    states = [entry(avail_idx=10, used_idx=10, last_avail_idx=10)] + \
             [entry(avail_idx=14, used_idx=10, last_avail_idx=10, shadow_avail_idx=14, kicks=1,
                    anomalies=[miss])] * 6
    a, _ = run(states)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED
    assert "read avail_idx 14" in d.evidence and "translation of IOVA 0xfffee000" in d.evidence
