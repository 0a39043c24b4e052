"""The QEMU source's queue entry (inspector.sources.qemu), built from a
QueueState as QMP would report it and a ring read through this process's
own memory as if it were QEMU's: the model's fields, the anomalies the
source adds, and the Snapshot JSON of README "Attaching to QEMU" exactly.
(QMP itself is exercised against a fake QEMU in tests/integration.)"""

from __future__ import annotations

import ctypes
import os

import pytest

from inspector.memory.process import ProcessMemory, RamRange
from inspector.ring.anomalies import AnomalyKind
from inspector.ring.packed import PackedRingSnapshot
from inspector.ring.snapshot import RingSnapshot
from inspector.snapshot import queue_to_json
from inspector.sources.qemu import DeviceState, QemuSource, QueueState
from inspector.spec.virtio import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from tests.support.packed_ringbuilder import PackedRingBuilder
from tests.support.ringbuilder import RingBuilder

PATH = "/machine/peripheral/fnet/virtio-backend"
FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX


def _hva(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


@pytest.fixture
def ring():
    rb = RingBuilder(8)
    rb.heads = [rb.add_chain(((64, False), (128, True))) for _ in range(3)]
    rb.publish()
    rb.device_use([(rb.heads[0], 0)])              # used_idx 1, avail_idx 3
    return rb


@pytest.fixture
def source(ring):
    src = QemuSource.__new__(QemuSource)           # no QMP: only what _queue_entry needs
    src.pid, src.qmp_path = os.getpid(), "/fake/qmp.sock"
    src._pmem = ProcessMemory(os.getpid())
    src._ram = [RamRange(r.gpa, r.size, _hva(r.buf)) for r in ring.mem.regions]
    src.refresh_map = lambda force=False: False    # the RAM map did not change
    yield src
    src._pmem.close()


def _dev(features: int = FEATURES, broken: bool = False, vhost: bool = False) -> DeviceState:
    return DeviceState(path=PATH, name="virtio-net", device="fnet", vhost_started=vhost, features=features,
                       num_vqs=3, broken=broken)


def _queue(ring: RingBuilder, **kw) -> QueueState:
    desc, avail, used = ring.addrs
    args = dict(index=0, num=8, desc=desc, avail=avail, used=used, vhost=False, last_avail_idx=2,
                qemu_used_idx=1, signalled_used=1, shadow_avail_idx=3)
    return QueueState(**(args | kw))


def test_queue_qemu_services(source, ring):
    q = _queue(ring)
    entry, dec = source._queue_entry(_dev(), q)
    assert isinstance(dec, RingSnapshot) and entry.chain_source is dec
    assert [c.head for c in entry.chains] == ring.heads[2:]
    assert queue_to_json(entry) == {
        "device": "fnet", "device_type": "net", "index": 0, "layout": "split", "size": 8,
        "features": FEATURES, "event_idx": True, "avail_idx": 3, "used_idx": 1, "last_avail_idx": 2,
        "shadow_avail_idx": 3, "inflight": 2, "avail_flags": 0, "used_flags": 0,
        "used_event": dec.used_event, "avail_event": dec.avail_event,
        "kicks": 0, "calls": 0, "calls_suppressed": 0, "packets": 0, "bytes": 0,
        "chains": dec.chain_dicts(), "anomalies": [],
        "qemu": {"path": PATH, "vhost": False, "desc": q.desc, "avail": q.avail, "used": q.used,
                 "used_idx": 1, "signalled_used": 1}}
    assert list(queue_to_json(entry))[-5:] == ["packets", "bytes", "chains", "anomalies", "qemu"]


def test_vhost_queue_with_addresses_that_disagree(source, ring):
    desc, avail, used = ring.addrs
    hva = {a: source._gpa_to_hva(a) for a in ring.addrs}
    q = _queue(ring, vhost=True, last_avail_idx=None, qemu_used_idx=None, signalled_used=None,
               shadow_avail_idx=None, desc_hva=hva[desc], avail_hva=hva[avail] + 4096,
               used_hva=hva[used], kick=30, call=31)
    entry, dec = source._queue_entry(_dev(vhost=True), q)
    assert entry.last_avail_idx is None and [c.head for c in entry.chains] == ring.heads[1:]
    # only the device knows what it read; the type is the device's all the same
    assert entry.shadow_avail_idx is None and entry.device_type == "net"
    assert [a.kind for a in entry.anomalies] == [AnomalyKind.ADDRESS_MISMATCH]
    assert entry.anomalies[0].detail.startswith(f"avail at guest-physical {avail:#x}: vhost has QEMU address")
    j = queue_to_json(entry)
    assert j["qemu"] == {"path": PATH, "vhost": True, "desc": desc, "avail": avail, "used": used,
                         "desc_hva": hva[desc], "avail_hva": hva[avail] + 4096, "used_hva": hva[used],
                         "kick": 30, "call": 31}
    assert j["anomalies"] == [{"kind": "address_mismatch", "detail": entry.anomalies[0].detail}]


def test_broken_device_comes_before_the_ring_anomalies(source, ring):
    ring.zero_len(ring.chain_ids(ring.heads[2])[0])
    entry, _ = source._queue_entry(_dev(broken=True), _queue(ring))
    assert [a.kind for a in entry.anomalies] == [AnomalyKind.DEVICE_BROKEN, AnomalyKind.ZERO_LEN]
    assert entry.anomalies[0].detail == f"QEMU marked {PATH} broken"
    assert entry.anomalies[1].head == ring.heads[2]


@pytest.fixture
def packed(source):
    """A packed ring QEMU services: 3 buffers made available, QEMU popped 2
    and returned the first; the source reads it through this process."""
    rb = PackedRingBuilder(8)
    rb.ids = [rb.add_chain(((64, False), (128, True))), rb.add_indirect_chain(), rb.add_chain()]
    rb.device_take(3)      # slots 0-1, 2
    rb.device_use([(rb.ids[0], 128)])
    source._ram = [RamRange(r.gpa, r.size, _hva(r.buf)) for r in rb.mem.regions]
    return rb


def _packed_queue(rb: PackedRingBuilder, **kw) -> QueueState:
    """The QueueState of x-query-virtio-queue-status for ``rb``: vring-avail
    and vring-used are the driver and device event suppression areas, and
    last-avail-idx / used-idx bare slots (QEMU keeps the wrap counters to
    itself)."""
    args = dict(index=0, num=rb.size, desc=rb.desc, avail=rb.driver_event, used=rb.device_event,
                vhost=False, last_avail_idx=rb.last_avail, qemu_used_idx=rb.next_used,
                signalled_used=rb.next_used, shadow_avail_idx=rb.next_avail)
    return QueueState(**(args | kw))


def test_packed_queue_qemu_services(source, packed):
    rb = packed
    q = _packed_queue(rb)
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_RING_PACKED), q)
    assert isinstance(dec, PackedRingSnapshot) and dec.positions == "derived"
    assert entry.layout == "packed" and entry.anomalies == []
    assert [c.head for c in entry.chains] == rb.ids[2:] and entry.chains[0].slot == 3
    j = queue_to_json(entry)
    assert (j["avail_idx"], j["used_idx"], j["used_event"]) == (None, None, None)
    assert (j["next_used"], j["used_wrap_counter"], j["last_avail_idx"], j["last_avail_wrap_counter"],
            j["next_avail"], j["avail_wrap_counter"], j["inflight"], j["positions"]) == (2, 1, 3, 1, 4, 1, 2, "derived")
    assert j["chains"] == dec.chain_dicts() and j["qemu"]["used_idx"] == 2


def test_packed_queue_positions_older_than_the_ring(source, packed):
    """QEMU answered before it returned more buffers: decoded from the
    flags, and _snapshot asks QMP again (_older_than_ring)."""
    from inspector.sources.qemu import _older_than_ring
    rb = packed
    q = _packed_queue(rb)
    rb.device_use([(rb.ids[1], 0)])
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_RING_PACKED), q)
    assert dec.positions == "flags" and entry.last_avail_idx is None and entry.anomalies == []
    assert _older_than_ring(q, dec)
    assert not _older_than_ring(_packed_queue(rb), source._queue_entry(
        _dev(FEATURES | 1 << VIRTIO_F_RING_PACKED), _packed_queue(rb))[1])


def test_packed_vhost_queue_is_read_from_the_flags(source, packed):
    rb = packed
    q = _packed_queue(rb, vhost=True, last_avail_idx=None, qemu_used_idx=None, signalled_used=None,
                      shadow_avail_idx=None, desc_hva=source._gpa_to_hva(rb.desc),
                      avail_hva=source._gpa_to_hva(rb.driver_event), used_hva=source._gpa_to_hva(rb.device_event))
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_RING_PACKED, vhost=True), q)
    assert dec.positions == "flags" and entry.last_avail_idx is None and entry.anomalies == []
    assert (entry.next_avail, entry.next_used) == (4, 1)   # next_used estimated (skipped slot 1 looks available)


@pytest.mark.parametrize("inuse", [0, 4])
def test_packed_full_ring_taken_or_not_is_told_by_inuse(source, inuse):
    """Every descriptor outstanding with last-avail-idx == used-idx: the
    ring says nothing taken; QEMU's inuse > 0 says everything taken."""
    rb = PackedRingBuilder(4)
    for _ in range(4):
        rb.add_chain()
    if inuse:
        rb.device_take(4)
    source._ram = [RamRange(r.gpa, r.size, _hva(r.buf)) for r in rb.mem.regions]
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_RING_PACKED), _packed_queue(rb, inuse=inuse))
    assert dec.positions == "derived" and entry.anomalies == [] and entry.inflight == 4
    assert (entry.last_avail_idx, entry.last_avail_wrap_counter) == (rb.last_avail, rb.last_avail_wrap)
    assert entry.n_chains == (0 if inuse else 4)


def test_packed_queue_slot_out_of_range_is_not_used(source, packed):
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_RING_PACKED),
                                     _packed_queue(packed, qemu_used_idx=40000, last_avail_idx=3))
    assert dec.positions == "flags" and entry.anomalies == []


def test_ring_outside_guest_ram_is_ring_unmapped(source, ring):
    entry, dec = source._queue_entry(_dev(), _queue(ring, desc=0xDEAD_0000_0000))
    assert dec is None and [a.kind for a in entry.anomalies] == [AnomalyKind.RING_UNMAPPED]
    assert "descriptor table at guest-physical 0xdead00000000" in entry.anomalies[0].detail


def test_queue_state_takes_shadow_avail_idx_from_qmp():
    """x-query-virtio-queue-status (QEMU 7.2 qapi/virtio.json VirtQueueStatus):
    ``shadow-avail-idx`` is there for a queue QEMU services."""
    from inspector.sources.qemu import queue_state

    reply = {"name": "virtio-net", "queue-index": 0, "inuse": 0, "vring-num": 256, "vring-num-default": 256,
             "vring-align": 4096, "vring-desc": 0x1000, "vring-avail": 0x2000, "vring-used": 0x3000,
             "last-avail-idx": 123, "shadow-avail-idx": 355, "used-idx": 123, "signalled-used": 123,
             "signalled-used-valid": True}
    q = queue_state(_dev(), 0, reply)
    assert (q.last_avail_idx, q.shadow_avail_idx) == (123, 355)
    del reply["shadow-avail-idx"]
    assert queue_state(_dev(), 0, reply).shadow_avail_idx is None


class _Hmp:
    """The one HMP command the vIOMMU check asks (``info mtree``), answered."""

    def __init__(self, mtree: str):
        self.mtree = mtree
        self.asked = 0

    def hmp(self, line: str) -> str:
        assert line == "info mtree"
        self.asked += 1
        return self.mtree


VTD_MTREE = """address-space: vtd-root
  0000000000000000-ffffffffffffffff (prio 0, i/o): vtd-09.0
    0000000000000000-ffffffffffffffff (prio 0, i/o): vtd-09.0-dmar
"""


@pytest.mark.parametrize("mtree, iova", [(VTD_MTREE, True), ("address-space: memory\n  0-1 (prio 0, i/o): system\n",
                                                              False)])
def test_access_platform_behind_a_viommu_is_not_read_as_guest_physical(source, ring, mtree, iova):
    """VIRTIO_F_ACCESS_PLATFORM on a machine with intel-iommu: the ring
    addresses are IOVAs: one iova_untranslated anomaly, no ring read, the
    indices QEMU itself holds. Without a vIOMMU the same queue is read."""
    from inspector.spec.virtio import VIRTIO_F_ACCESS_PLATFORM
    source.qmp = _Hmp(mtree)
    source.map_refresh = 3.0
    source._iommu, source._iommu_checked = None, None
    entry, dec = source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_ACCESS_PLATFORM), _queue(ring))
    if iova:
        assert dec is None and [a.kind for a in entry.anomalies] == [AnomalyKind.IOVA_UNTRANSLATED]
        assert "intel-iommu" in entry.anomalies[0].detail and f"desc {ring.addrs[0]:#x}" in entry.anomalies[0].detail
        assert (entry.avail_idx, entry.used_idx, entry.inflight) == (3, 1, 2)
        assert entry.chains == []
    else:
        assert dec is not None and entry.anomalies == [] and entry.avail_idx == 3
    source._queue_entry(_dev(FEATURES | 1 << VIRTIO_F_ACCESS_PLATFORM), _queue(ring))
    assert source.qmp.asked == 1        # asked again only after map_refresh seconds
