"""The device IOTLB (csrc/vqd_iotlb.c, inspector/datapath/iotlb.py) and the
C data path translating through it (VIRTIO_F_ACCESS_PLATFORM), driven
directly: rings built with DriverRing whose descriptors carry IOVAs, the
device side a DeviceQueue / PackedDeviceQueue with the IOTLB attached.
"""

from __future__ import annotations

import threading

import pytest

from inspector.datapath.iotlb import Iotlb, IotlbMiss, IotlbRejected
from inspector.datapath.packed_queue import PackedDeviceQueue
from inspector.datapath.queue import DeviceQueue
from inspector.errors import RingError
from inspector.memory import GuestMemory, iova_view
from inspector.ring import decoder
from inspector.ring.driver import DriverRing
from inspector.ring.driver_packed import PackedDriverRing
from inspector.spec.vhost import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO

GPA = 0x100000
UVA = 0x7F0000000000
IOVA = 0xFFF00000000      # IOVA of GPA: obviously neither a gpa nor a uva
MEM_SIZE = 1 << 20
PAGE = 4096
DATA = GPA + 0x10000


def mem_():
    m = GuestMemory()
    m.add(GPA, bytearray(MEM_SIZE), uva=UVA)
    return m


def iova(gpa):
    return gpa - GPA + IOVA


def uva(gpa):
    return gpa - GPA + UVA


def tlb_for(mem, capacity=1024):
    t = Iotlb(capacity=capacity)
    t.set_memory(mem)
    return t


# --- the table ------------------------------------------------------------------------

def test_update_lookup_and_identical_update():
    mem = mem_()
    t = tlb_for(mem)
    assert t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RW) is True
    assert t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RW) is False          # identical: no-op
    assert t.translate(IOVA + 0x10, 0x100, VHOST_ACCESS_RO, "x") == UVA + 0x10
    assert t.entries() == [(IOVA, PAGE, UVA, VHOST_ACCESS_RW)]
    st = t.stats()
    assert st["entries"] == 1 and st["updates"] == 1 and st["rejected"] == 0
    t.close()


@pytest.mark.parametrize("args, field", [
    ((IOVA, 0, UVA, VHOST_ACCESS_RO), "size"),                       # zero size
    ((0xFFFF_FFFF_FFFF_F000, 0x2000, UVA, VHOST_ACCESS_RO), "iova"),  # iova + size past 2^64
    ((IOVA, PAGE, UVA, 0), "perm"),                                   # no access at all
    ((IOVA, PAGE, UVA, 7), "perm"),
    ((IOVA, PAGE, UVA + MEM_SIZE, VHOST_ACCESS_RO), "uaddr"),         # outside the memory table
    ((IOVA, 2 * PAGE, UVA + MEM_SIZE - PAGE, VHOST_ACCESS_RO), "uaddr"),  # runs past its region
])
def test_hostile_updates_are_refused_and_change_nothing(args, field):
    t = tlb_for(mem_())
    t.update(IOVA + 0x100000, PAGE, UVA + PAGE, VHOST_ACCESS_RO)
    with pytest.raises(IotlbRejected) as e:
        t.update(*args)
    assert e.value.field == field
    assert t.entries() == [(IOVA + 0x100000, PAGE, UVA + PAGE, VHOST_ACCESS_RO)]
    assert t.stats()["rejected"] == 1
    t.close()


def test_overlapping_update_is_refused_naming_the_entry():
    t = tlb_for(mem_())
    t.update(IOVA + PAGE, PAGE, UVA, VHOST_ACCESS_RO)
    for a, n in ((IOVA, 2 * PAGE), (IOVA + PAGE + 8, 8), (IOVA + 2 * PAGE - 1, PAGE)):
        with pytest.raises(IotlbRejected, match="overlaps the entry"):
            t.update(a, n, UVA + 2 * PAGE, VHOST_ACCESS_RO)
    with pytest.raises(IotlbRejected):               # same range, other perm
        t.update(IOVA + PAGE, PAGE, UVA, VHOST_ACCESS_RW)
    t.update(IOVA, PAGE, UVA + 2 * PAGE, VHOST_ACCESS_RO)      # the neighbours do not overlap
    t.update(IOVA + 2 * PAGE, PAGE, UVA + 3 * PAGE, VHOST_ACCESS_RO)
    assert [e[0] for e in t.entries()] == [IOVA, IOVA + PAGE, IOVA + 2 * PAGE]
    t.close()


def test_invalidate_drops_overlapping_entries_and_counts_unmapped_ranges():
    t = tlb_for(mem_())
    for k in range(4):
        t.update(IOVA + k * PAGE, PAGE, UVA + k * PAGE, VHOST_ACCESS_RW)
    assert t.invalidate(IOVA + PAGE + 100, PAGE) == (2, False)   # touches pages 1 and 2: both go whole
    assert [e[0] for e in t.entries()] == [IOVA, IOVA + 3 * PAGE]
    assert t.invalidate(IOVA + 0x10000000, PAGE) == (0, False)   # never mapped: no error, counted
    st = t.stats()
    assert st["invalidations"] == 1 and st["invalidations_unmapped"] == 1
    with pytest.raises(IotlbMiss):
        t.translate(IOVA + PAGE, 8, VHOST_ACCESS_RO, "x")
    t.close()


@pytest.mark.parametrize("iova, size", [(IOVA + PAGE, 0), (IOVA + PAGE, 0xFFFF_FFFF_FFFF_FFFF), (0, 0)])
def test_a_malformed_invalidate_drops_to_the_end_of_the_iova_space(iova, size):
    # size 0 is QEMU's whole-space flush (addr_mask + 1 overflowed); past 2^64 is malformed:
    # both are read as running to the end, never as nothing (a revoked mapping must not stay)
    t = tlb_for(mem_())
    for k in range(4):
        t.update(IOVA + k * PAGE, PAGE, UVA + k * PAGE, VHOST_ACCESS_RW)
    dropped, clamped = t.invalidate(iova, size)
    assert clamped
    assert [e[0] for e in t.entries()] == ([] if iova == 0 else [IOVA])
    assert dropped == (4 if iova == 0 else 3)
    t.close()


def test_a_full_table_evicts_and_stays_bounded():
    t = tlb_for(mem_(), capacity=8)
    for k in range(40):
        t.update(IOVA + k * PAGE, PAGE, UVA + k * PAGE, VHOST_ACCESS_RO)
    st = t.stats()
    assert st["entries"] == 8 and st["evictions"] == 32
    es = t.entries()
    assert es == sorted(es) and len({e[0] for e in es}) == 8
    assert (IOVA + 39 * PAGE, PAGE, UVA + 39 * PAGE, VHOST_ACCESS_RO) in es   # the newest stays
    t.close()


def test_translate_joins_contiguous_entries_and_refuses_perm_or_gaps():
    t = tlb_for(mem_())
    t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RW)
    t.update(IOVA + PAGE, PAGE, UVA + PAGE, VHOST_ACCESS_RW)
    assert t.translate(IOVA + 100, PAGE, VHOST_ACCESS_WO, "ring") == UVA + 100   # across two entries
    t.update(IOVA + 2 * PAGE, PAGE, UVA + 5 * PAGE, VHOST_ACCESS_RW)              # contiguous IOVA, not uaddr
    with pytest.raises(IotlbRejected, match="not contiguous"):
        t.translate(IOVA + PAGE, 2 * PAGE, VHOST_ACCESS_RO, "ring")
    with pytest.raises(IotlbMiss) as m:
        t.translate(IOVA + 2 * PAGE, 2 * PAGE, VHOST_ACCESS_RO, "ring")
    assert m.value.iova == IOVA + 3 * PAGE
    t.update(IOVA + 8 * PAGE, PAGE, UVA + 8 * PAGE, VHOST_ACCESS_RO)
    with pytest.raises(IotlbRejected, match="needs wo"):
        t.translate(IOVA + 8 * PAGE, 8, VHOST_ACCESS_WO, "used ring")
    t.close()


def test_memory_change_flushes():
    mem = mem_()
    t = tlb_for(mem)
    t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RW)
    t.set_memory(mem_())
    assert t.entries() == []
    t.close()


def test_misses_are_deduped_per_page_and_asked_again_after_an_update():
    sent = []
    t = Iotlb(miss_sink=lambda i, p: sent.append((i, p)) or True)
    t.set_memory(mem_())
    assert t.ask(IOVA + 8, VHOST_ACCESS_RO) is True
    assert t.ask(IOVA + 16, VHOST_ACCESS_RO) is False       # same page, asked just now
    assert t.ask(IOVA + 16, VHOST_ACCESS_WO) is True        # another access
    woke = threading.Event()
    t.add_waker(1, woke.set)
    t.update(IOVA + 10 * PAGE, PAGE, UVA, VHOST_ACCESS_RO)  # an UPDATE elsewhere: workers wake, ...
    assert woke.is_set()
    assert t.ask(IOVA + 8, VHOST_ACCESS_RO) is False        # ... but this page's ask still stands
    t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RO)              # an UPDATE of the page: it may be asked again
    assert t.ask(IOVA + 8, VHOST_ACCESS_RO) is True
    assert sent == [(IOVA + 8, 1), (IOVA + 16, 2), (IOVA + 8, 1)] and t.stats()["misses"] == 3
    t.close()


# --- the data path through it ---------------------------------------------------------

class Rig:
    """A split driver ring whose descriptor and ring addresses are IOVAs,
    and the device queue translating them through an IOTLB."""

    def __init__(self, size=8, packed=False):
        self.mem = mem_()
        self.tlb = tlb_for(self.mem)
        self.packed = packed
        if packed:
            self.drv = PackedDriverRing(self.mem, GPA, size)
            self.dev = PackedDeviceQueue(self.mem, size, uva(self.drv.desc_addr), uva(self.drv.driver_event_addr),
                                         uva(self.drv.device_event_addr))
        else:
            self.drv = DriverRing(self.mem, GPA, size)
            self.dev = DeviceQueue(self.mem, size, uva(self.drv.desc_addr), uva(self.drv.avail_addr),
                                   uva(self.drv.used_addr))
        self.dev.attach_iotlb(self.tlb)

    def map(self, gpa, size, perm):
        self.tlb.update(iova(gpa), size, uva(gpa), perm)

    def add(self, bufs):
        """bufs: [(gpa, len, device_writable)]; descriptors carry IOVAs."""
        head = self.drv.add_chain([(iova(g), n, w) for g, n, w in bufs])
        self.drv.publish()
        return head

    def close(self):
        self.dev.release()
        self.tlb.close()


@pytest.mark.parametrize("packed", [False, True])
def test_a_miss_leaves_the_chain_and_the_update_lets_it_through(packed):
    rig = Rig(packed=packed)
    rig.mem.view(DATA, 5)[:] = b"hello"
    rig.add([(DATA, 5, False), (DATA + 2 * PAGE, 64, True)])
    assert rig.dev.pop() == []                    # nothing mapped: a miss, not a break
    assert rig.dev.broken is None
    assert rig.dev.take_miss() == (iova(DATA), VHOST_ACCESS_RO)
    assert rig.dev.iotlb_waiting and rig.dev.take_miss() is None
    rig.map(DATA, PAGE, VHOST_ACCESS_RO)
    assert not rig.dev.iotlb_waiting              # an UPDATE came: try again
    assert rig.dev.pop() == []                    # the writable part still misses
    assert rig.dev.take_miss() == (iova(DATA + 2 * PAGE), VHOST_ACCESS_WO)
    rig.map(DATA + 2 * PAGE, PAGE, VHOST_ACCESS_RW)
    (c,) = rig.dev.pop()
    assert bytes(c.out[0]) == b"hello" and c.in_len == 64
    c.in_[0][:3] = b"abc"
    rig.dev.push([(c.head, 3)])
    assert rig.mem.read(DATA + 2 * PAGE, 3) == b"abc"
    assert rig.dev.broken is None
    rig.close()


@pytest.mark.parametrize("packed", [False, True])
def test_a_device_write_through_a_read_only_entry_breaks_the_queue_and_writes_nothing(packed):
    rig = Rig(packed=packed)
    rig.map(DATA, PAGE, VHOST_ACCESS_RO)
    rig.add([(DATA, 64, True)])
    with pytest.raises(RingError, match=r"device write at IOVA 0x[0-9a-f]+ through an IOTLB entry with perm ro"):
        rig.dev.pop()
    assert "perm ro" in rig.dev.broken
    assert rig.mem.read(DATA, 64) == bytes(64)
    rig.close()


def test_a_buffer_across_two_entries_becomes_two_iovecs_when_they_are_apart_in_host_memory():
    rig = Rig()
    rig.tlb.update(iova(DATA), PAGE, uva(DATA), VHOST_ACCESS_RO)
    rig.tlb.update(iova(DATA) + PAGE, PAGE, uva(DATA) + 4 * PAGE, VHOST_ACCESS_RO)   # elsewhere
    rig.mem.view(DATA + PAGE - 2, 2)[:] = b"ab"
    rig.mem.view(DATA + 4 * PAGE, 2)[:] = b"cd"
    rig.add([(DATA + PAGE - 2, 4, False)])
    (c,) = rig.dev.pop()
    assert [bytes(v) for v in c.out] == [b"ab", b"cd"]
    rig.close()


def test_invalidate_takes_effect_before_the_next_access():
    rig = Rig()
    rig.map(DATA, PAGE, VHOST_ACCESS_RW)
    rig.add([(DATA, 8, True)])
    (c,) = rig.dev.pop()
    rig.dev.push([(c.head, 8)])
    assert rig.tlb.invalidate(iova(DATA), PAGE) == (1, False)
    rig.add([(DATA, 8, True)])
    assert rig.dev.pop() == [] and rig.dev.take_miss() == (iova(DATA), VHOST_ACCESS_WO)
    rig.close()


def test_the_iova_view_decodes_an_iova_ring():
    rig = Rig()
    rig.map(GPA, 4 * PAGE, VHOST_ACCESS_RW)       # the rings
    rig.map(DATA, PAGE, VHOST_ACCESS_RO)
    rig.add([(DATA, 16, False)])
    view = iova_view(rig.mem, rig.tlb.entries())
    dec = decoder.snapshot_split(view, 8, iova(rig.drv.desc_addr), iova(rig.drv.avail_addr),
                                 iova(rig.drv.used_addr), 0)
    assert dec.n_chains == 1 and not dec.anomalies
    unmapped = iova_view(rig.mem, [e for e in rig.tlb.entries() if e[0] != iova(DATA)])
    dec = decoder.snapshot_split(unmapped, 8, iova(rig.drv.desc_addr), iova(rig.drv.avail_addr),
                                 iova(rig.drv.used_addr), 0)
    assert [a.kind.value for a in dec.anomalies] == ["addr_out_of_range"]
    rig.close()


def test_a_mirror_translates_without_host_pointers():
    # a proxy's mirror: entries carry no host pointer, translations still work (joined on uaddr)
    t = Iotlb(mirror=True)
    t.set_memory(mem_())
    t.update(IOVA, PAGE, UVA, VHOST_ACCESS_RW)
    t.update(IOVA + PAGE, PAGE, UVA + PAGE, VHOST_ACCESS_RW)
    assert t.translate(IOVA + 8, PAGE, VHOST_ACCESS_RO, "desc ring") == UVA + 8
    with pytest.raises(IotlbMiss):
        t.translate(IOVA + 2 * PAGE, 8, VHOST_ACCESS_RO, "x")
    with pytest.raises(IotlbRejected):
        t.update(IOVA, PAGE, UVA + MEM_SIZE, VHOST_ACCESS_RO)   # still checked against the memory table
    t.close()
