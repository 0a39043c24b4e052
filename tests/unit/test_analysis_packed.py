"""The doctor's rules on packed queues (VIRTIO 1.2 §2.8), from hand-built
packed QueueEntry sequences: positions (slot, wrap) as counters modulo
2·size (inspector.ring.packed), kicks governed by the device's event
suppression and calls by the driver's (§2.8.10: ENABLE, DISABLE, DESC at
(off, wrap)). The split rules' own tests are in test_analysis.py."""

from __future__ import annotations

from inspector.analysis import Severity, Verdict
from inspector.analysis.rules import Observation
from inspector.ring.packed import packed_counter
from inspector.spec.virtio import RING_EVENT_FLAGS_DESC as DESC
from inspector.spec.virtio import RING_EVENT_FLAGS_DISABLE as DISABLE
from inspector.spec.virtio import RING_EVENT_FLAGS_ENABLE as ENABLE

from tests.support.packed_queues import packed_entry

from .test_analysis import T0, run, verdict

N = 8  # ring size: positions wrap quickly


def pos(c: int) -> tuple[int, int]:
    """(slot, wrap) of counter ``c`` in a ring of N (the inverse of packed_counter)."""
    c %= 2 * N
    return c % N, 1 if c < N else 0


def tx(used, avail, last_avail=None, device_event=(ENABLE, 0, 1), driver_event=None, **kw):
    """A packed net TX queue (the device consumes) at counters ``used``,
    ``avail``, ``last_avail`` (default: the device read everything)."""
    la = avail if last_avail is None else last_avail
    de = driver_event if driver_event is not None else (DESC, *pos(used))
    return packed_entry(index=1, size=N, used=pos(used), avail=pos(avail),
                        last_avail=pos(la) if la is not False else None,
                        device_event=device_event, driver_event=de, **kw)


def rx(used, avail, driver_event, **kw):
    """A packed net RX queue (the driver fills); the device read everything it took."""
    return packed_entry(index=0, size=N, used=pos(used), avail=pos(avail), last_avail=pos(kw.pop("la", used)),
                        driver_event=driver_event, **kw)


def test_observation_counters_are_the_packed_positions():
    q = tx(13, 17, last_avail=15, device_event=(DESC, *pos(15)))
    ob = Observation.of(q, T0)
    assert (ob.used_idx, ob.avail_idx, ob.last_avail_idx) == (13, 1, 15)     # 17 mod 2·8
    assert ob.avail_event == packed_counter(7, 0, N) == 15 and ob.used_event == 13
    assert ob.dist(ob.used_idx, ob.avail_idx) == 4 == q.inflight and ob.at(15) == "slot 7 wrap 0"


# --- healthy / idle -------------------------------------------------------------------------

def test_moving_packed_queue_is_healthy_then_idle_across_wraps():
    states = [tx(3 * i, 3 * i, kicks=i, calls=i) for i in range(8)]    # 24 slots: three wraps
    a, _ = run(states)
    assert verdict(a).verdict is Verdict.HEALTHY
    a, changes = run(states + [states[-1]] * 12)
    assert [c.verdict for c in changes] == [Verdict.IDLE, Verdict.HEALTHY, Verdict.IDLE]


def test_busy_packed_queue_with_descriptors_outstanding_is_healthy():
    states = [tx(2 * i, 2 * i + 3, kicks=i, calls=i) for i in range(20)]
    a, changes = run(states)
    assert all(c.ok for c in changes)


def test_packed_rx_waiting_for_data_is_idle():
    a, _ = run([rx(0, 8, (DESC, 0, 1))] * 12)
    assert verdict(a, 0).verdict is Verdict.IDLE and verdict(a, 0).role == "fill"


# --- device side: device_stalled, kick_missing, suppression_stuck --------------------------------

def test_packed_device_took_descriptors_and_returned_none():
    states = [tx(6, 6)] + [tx(6, 10, last_avail=10, kicks=1)] * 6      # across the wrap: slots 6, 7, 0, 1
    a, _ = run(states)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED and d.severity is Severity.ERROR
    assert d.evidence.startswith("the device took 4 buffers (last_avail_idx slot 2 wrap 0) and returned none")
    assert "next_used slot 6 wrap 1, next_avail slot 2 wrap 0" in d.evidence


def test_packed_kick_missing_under_device_event_enable():
    """Device event flags ENABLE: every descriptor made available wants a
    kick (§2.8.10); the device never read past slot 5 and no kick came."""
    base = tx(5, 5, device_event=(ENABLE, 0, 1), kicks=7)
    waiting = tx(5, 8, last_avail=5, device_event=(ENABLE, 0, 1), kicks=7)
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.KICK_MISSING, d
    assert ("3 descriptors published past last_avail_idx slot 5 wrap 1 under device event flags ENABLE "
            "(§2.8.10) required a kick") in d.evidence and "(next_avail slot 0 wrap 0)" in d.evidence


def test_packed_kick_due_under_desc_iff_the_driver_passed_the_device_event():
    """Device event flags DESC at (off, wrap) = the device's read position:
    the driver's move from slot 6 (wrap 1) to slot 1 (wrap 0) passes it,
    a kick was due (kick_missing); an event at slot 4 wrap 0, ahead of the
    driver, was not passed: no kick was owed (suppression_stuck)."""
    due = [tx(6, 6, device_event=(DESC, *pos(6)), kicks=2)] + \
          [tx(6, 9, last_avail=6, device_event=(DESC, *pos(6)), kicks=2)] * 6
    a, _ = run(due)
    d = verdict(a)
    assert d.verdict is Verdict.KICK_MISSING, d
    assert "under the device's event off slot 6 wrap 1 (device event flags DESC, §2.8.10)" in d.evidence
    stale = [tx(6, 6, device_event=(DESC, *pos(12)), kicks=2)] + \
            [tx(6, 9, last_avail=6, device_event=(DESC, *pos(12)), kicks=2)] * 6
    a, _ = run(stale)
    d = verdict(a)
    assert d.verdict is Verdict.SUPPRESSION_STUCK, d
    assert ("the device's event off slot 4 wrap 0 is not in [last_avail_idx slot 6 wrap 1, next_avail "
            "slot 1 wrap 0)") in d.evidence


def test_packed_device_event_disable_left_set_is_suppression_stuck():
    base = tx(3, 3, device_event=(DISABLE, 0, 1))
    waiting = tx(3, 5, last_avail=3, device_event=(DISABLE, 0, 1))
    a, _ = run([base] + [waiting] * 6)
    d = verdict(a)
    assert d.verdict is Verdict.SUPPRESSION_STUCK and "RING_EVENT_FLAGS_DISABLE" in d.evidence
    assert "2 descriptors wait past last_avail_idx slot 3 wrap 1" in d.evidence


def test_packed_kick_cannot_be_told_without_notification_counters():
    base = tx(5, 5)
    waiting = tx(5, 8, last_avail=False)   # QEMU-like: the device's read position unknown
    a, _ = run([base] + [waiting] * 6, seen=False)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED and "cannot tell" in d.evidence
    assert "published past next_used slot 5 wrap 1" in d.evidence


def test_packed_device_event_tells_the_device_read_its_descriptors():
    """No read position from the source, but the device re-armed kicks at
    slot 0 wrap 0 (its event off): it read the descriptors and took none."""
    base = tx(5, 5, last_avail=False, device_event=(DESC, *pos(5)))
    waiting = tx(5, 9, last_avail=False, device_event=(DESC, *pos(8)))
    a, _ = run([base] + [waiting] * 6, seen=False)
    d = verdict(a)
    assert d.verdict is Verdict.DEVICE_STALLED
    assert "the device read up to slot 0 wrap 0 (the device's event off) but took none" in d.evidence


# --- driver side: call_missing, driver_stalled ---------------------------------------------------

def test_packed_call_missing_when_next_used_passed_the_driver_event():
    """Driver event flags DESC at slot 6 wrap 1: the device's next_used went
    to slot 2 wrap 0 (passed it by 4, across the wrap) and no call came."""
    states = [rx(6, 14, (DESC, 6, 1), calls=40)] + [rx(10, 14, (DESC, 6, 1), calls=40)] * 6
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.CALL_MISSING, d
    assert d.evidence.startswith("next_used slot 2 wrap 0 passed the driver's event off slot 6 wrap 1 by 4 "
                                 "(driver event flags DESC, §2.8.10: a call was due)")
    assert "none sent" in d.evidence


def test_packed_driver_stalled_when_calls_were_sent():
    states = [rx(6, 14, (DESC, 6, 1), calls=40)] + [rx(10, 14, (DESC, 6, 1), calls=41)] * 6
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.DRIVER_STALLED and "1 calls sent, driver did not respond" in d.evidence


def test_packed_driver_event_zero_is_a_real_request():
    """Unlike split's used_event 0 (Linux disabling callbacks), DESC at slot 0
    is a position like any other: Linux disables packed calls with DISABLE."""
    states = [rx(0, 8, (DESC, 0, 1), calls=3)] + [rx(3, 8, (DESC, 0, 1), calls=3)] * 6
    a, _ = run(states)
    assert verdict(a, 0).verdict is Verdict.CALL_MISSING


def test_packed_driver_event_disable_owes_no_call():
    states = [rx(0, 8, (DISABLE, 0, 1), calls=3)] + [rx(3, 8, (DISABLE, 0, 1), calls=3)] * 6
    a, _ = run(states)
    assert verdict(a, 0).ok


def test_packed_call_missing_under_driver_event_enable():
    """Driver event flags ENABLE: every used descriptor wants a call; the
    device returned 4 and its call counter stood still for the threshold."""
    states = [tx(2, 6, driver_event=(ENABLE, 0, 1), calls=5)] + \
             [tx(6, 6, driver_event=(ENABLE, 0, 1), calls=5)] * 6
    a, _ = run(states)
    d = verdict(a)
    assert d.verdict is Verdict.CALL_MISSING, d
    assert d.evidence.startswith("the device returned 4 descriptors (next_used slot 2 wrap 1 to slot 6 wrap 1) "
                                 "under driver event flags ENABLE (§2.8.10: every used descriptor wants a call)")
    # A call after the returns: nothing owed. Without call counters: nothing to tell.
    called = states[:2] + [tx(6, 6, driver_event=(ENABLE, 0, 1), calls=6)] * 5
    a, _ = run(called)
    assert verdict(a).ok
    a, _ = run(states, seen=False)
    assert verdict(a).ok


# --- starved ------------------------------------------------------------------------------------

def test_packed_starved_rx_with_drops_and_a_polling_driver():
    states = [rx(12, 12, (DISABLE, 0, 1), calls=9, dropped=0)] + \
             [rx(12, 12, (DISABLE, 0, 1), calls=9, dropped=5 * i) for i in range(1, 8)]
    a, _ = run(states)
    d = verdict(a, 0)
    assert d.verdict is Verdict.STARVED and d.severity is Severity.WARNING
    assert d.evidence.startswith("no buffer posted for at least 3.5 s (next_avail slot 4 wrap 0) while 35 frames")
    assert "(driver event flags DISABLE: the driver said it polls)" in d.evidence


def test_packed_starved_after_the_device_filled_the_last_buffer():
    states = [rx(10, 12, (DESC, *pos(10)), calls=9)] + [rx(12, 12, (DESC, *pos(12)), calls=10)] * 7
    a, _ = run(states)
    assert verdict(a, 0).verdict is Verdict.STARVED


def test_packed_ring_not_read_is_idle():
    q = packed_entry(index=1, size=N)
    for f in ("next_avail", "avail_wrap_counter", "next_used", "used_wrap_counter"):
        setattr(q, f, None)
    a, _ = run([q] * 10)
    assert verdict(a).verdict is Verdict.IDLE
