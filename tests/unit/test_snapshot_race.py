"""The back-end snapshot reads a live ring: the device's ``last_avail_idx``
and the ring are read at slightly different times. A stale
``last_avail_idx`` must not show as the driver's ``avail_idx_jump``
(VIRTIO 1.2 §2.7.13.3 bounds ``avail_idx - used_idx``, not our copy)."""

from inspector.devices.base import QueueStats, VringConfig
from inspector.introspect.snapshot import queue_snapshot
from inspector.ring.anomalies import AnomalyKind
from tests.support.ringbuilder import RingBuilder


def _ring_with_refill():
    """An 8-entry ring the device has consumed and used 8 of, refilled by
    the driver with 8 more: avail_idx 16, used_idx 8, device's last_avail 8."""
    rb = RingBuilder(8)
    heads = [rb.add_chain() for _ in range(8)]
    rb.publish()
    rb.device_use([(h, 64) for h in heads])
    assert len(rb.ring.get_used()) == 8  # the driver reclaims the descriptors
    for _ in range(8):
        rb.add_chain()
    rb.publish()
    desc, avail, used = rb.addrs
    vring = VringConfig(index=0, num=8, desc_uva=desc, avail_uva=avail, used_uva=used, addr_set=True)
    return rb, vring


def _kinds(entry):
    return [a.kind for a in entry.anomalies]


def test_stale_last_avail_is_re_read_not_reported():
    rb, vring = _ring_with_refill()
    stale = QueueStats(last_avail_idx=0)   # read before the device took the first 8
    fresh = QueueStats(last_avail_idx=8)
    calls = []

    def restat():
        calls.append(1)
        return fresh

    entry = queue_snapshot("net0", vring, rb.mem, 0, stale, restat=restat)
    assert AnomalyKind.AVAIL_IDX_JUMP not in _kinds(entry)
    assert entry.last_avail_idx == 8 and entry.avail_idx == 16 and len(entry.chains) == 8
    assert calls == [1]


def test_a_real_jump_survives_the_re_read():
    rb, vring = _ring_with_refill()
    rb.jump_avail_idx(100)  # the driver's own fault: more than the ring size ahead
    stats = QueueStats(last_avail_idx=8)
    entry = queue_snapshot("net0", vring, rb.mem, 0, stats, restat=lambda: QueueStats(last_avail_idx=8))
    assert AnomalyKind.AVAIL_IDX_JUMP in _kinds(entry)


def test_without_restat_the_stale_value_is_reported_as_read():
    rb, vring = _ring_with_refill()
    entry = queue_snapshot("net0", vring, rb.mem, 0, QueueStats(last_avail_idx=0))
    assert AnomalyKind.AVAIL_IDX_JUMP in _kinds(entry)
