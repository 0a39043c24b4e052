"""The vhost-net device IOTLB without a kernel: the mirror of a struct
vhost_iotlb (probes/iotlb.py) fed literal operations as the kernel's
vhost_iotlb_add_range_ctx / del_range / reset do them, the translation
ranges built from its maps, the BTF offsets the walk uses (Debian 6.1's
saved BTF), and a vhost-net queue entry read through the IOTLB from this
process's memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

from inspector.memory.process import RamRange
from inspector.ring.anomalies import Anomaly, AnomalyKind
from inspector.sources.vhost_net import iova_ranges, untranslated
from probes.btf import Btf
from probes.iotlb import (OP_ADD, OP_DEL, OP_RESET, OP_SEEN, OP_WALK_TRUNCATED, VHOST_IOTLB_FLAG_RETIRE,
                          IotlbMap, IotlbMirror, IotlbOp, translation_ranges)
from probes.vhost_net import iotlb_offsets

RO, WO, RW = 1, 2, 3
PAGE = 4096
DATA = Path(__file__).resolve().parent.parent / "data" / "btf"
VER = "6.1.0-56-amd64"


def test_add_keeps_overlaps_and_del_drops_every_overlapping_map_whole():
    """vhost_iotlb_add_range_ctx allows overlapping maps;
    vhost_iotlb_del_range removes every map overlapping the range, whole
    (an invalidation of one byte drops a 2-page map)."""
    m = IotlbMirror()
    assert m.add(0x1000, 0x2FFF, 0xA000, RO)
    assert m.add(0x2000, 0x2FFF, 0xB000, RW)      # overlaps the first
    assert m.add(0x5000, 0x5FFF, 0xC000, WO)
    assert len(m) == 3
    assert m.delete(0x2FFF, 0x2FFF) == 2           # both overlapping maps, whole
    assert m.maps() == [IotlbMap(0x5000, 0x5FFF, 0xC000, WO)]
    assert m.delete(0x9000, 0x9FFF) == 0           # never mapped: nothing, no error


def test_hostile_adds_are_refused_as_the_kernel_refuses_them():
    """iova + size - 1 wrapping (last < start) and values past u64 are
    refused (the kernel's add_range returns -EFAULT); nothing is kept."""
    m = IotlbMirror()
    assert not m.add(0x2000, 0x1FFF, 0xA000, RO)   # size 0: last = start - 1
    assert not m.add(0xFFFF_FFFF_FFFF_F000, (0xFFFF_FFFF_FFFF_F000 + 0x2000 - 1) & (2**64 - 1), 0, RO)
    assert not m.add(0, 1 << 64, 0, RO)
    assert len(m) == 0 and m.refused == 3


def test_full_iotlb_retires_its_oldest_map_and_the_mirror_is_bounded():
    m = IotlbMirror()
    for i in range(4):
        m.apply(IotlbOp(OP_ADD, 0xFFFF0000, i * PAGE, i * PAGE + PAGE - 1, 0x10000 + i * PAGE, RO,
                        limit=3, flags=VHOST_IOTLB_FLAG_RETIRE))
    assert [x.start for x in m.maps()] == [PAGE, 2 * PAGE, 3 * PAGE] and m.complete
    small = IotlbMirror(max_maps=2)
    for i in range(3):
        small.add(i * PAGE, i * PAGE + PAGE - 1, i * PAGE, RO)
    assert len(small) == 2 and small.dropped == 1 and not small.complete


def test_walk_records_dedupe_reset_clears_truncation_marks_incomplete():
    """OP_SEEN (the walk of maps present at attach) does not duplicate a map
    an add already brought; a truncated walk makes the mirror incomplete;
    a reset (vhost_iotlb_free) empties it."""
    m = IotlbMirror()
    assert not m.walked
    m.apply(IotlbOp(OP_ADD, 1, 0x1000, 0x1FFF, 0xA000, RO))
    m.apply(IotlbOp(OP_SEEN, 1, 0x1000, 0x1FFF, 0xA000, RO))
    m.apply(IotlbOp(OP_SEEN, 1, 0x3000, 0x3FFF, 0xC000, RW))
    assert m.walked and len(m) == 2 and m.complete
    m.apply(IotlbOp(OP_WALK_TRUNCATED, 1))
    assert not m.complete
    m.apply(IotlbOp(OP_DEL, 1, 0x3000, 0x3000))
    assert len(m) == 1
    m.apply(IotlbOp(OP_RESET, 1))
    assert len(m) == 0 and m.complete and m.ops == 6


def test_page_updates_merge_into_one_range_per_area():
    """4 KiB updates contiguous in IOVA and in user address, same
    permission: one range; a permission change or a jump in either space
    starts another."""
    maps = [IotlbMap(0x1_0000_0000 + i * PAGE, 0x1_0000_0000 + i * PAGE + PAGE - 1, 0x7F00_0000 + i * PAGE, WO)
            for i in (2, 0, 1)]                                       # out of order
    maps.append(IotlbMap(0x1_0000_3000, 0x1_0000_3FFF, 0x7F00_3000, RO))   # next page, other perm
    maps.append(IotlbMap(0x1_0000_4000, 0x1_0000_4FFF, 0x7F10_0000, RO))   # IOVA next, uaddr jumps
    r = translation_ranges(maps)
    assert r == [(0x1_0000_0000, 3 * PAGE, 0x7F00_0000, WO), (0x1_0000_3000, PAGE, 0x7F00_3000, RO),
                 (0x1_0000_4000, PAGE, 0x7F10_0000, RO)]
    # the ring reader needs addresses only: contiguous in both spaces is one RamRange
    assert iova_ranges(r) == [RamRange(0x1_0000_0000, 4 * PAGE, 0x7F00_0000), RamRange(0x1_0000_4000, PAGE, 0x7F10_0000)]


def test_overlapping_maps_translate_through_the_lowest_start_like_the_kernel():
    """vhost_iotlb_itree_first returns the overlapping map of lowest start:
    a later-starting map only adds what the earlier ones do not cover."""
    maps = [IotlbMap(0x2000, 0x5FFF, 0xB800, RO),
            IotlbMap(0x1000, 0x2FFF, 0xA000, RO),
            IotlbMap(0x1800, 0x1FFF, 0xF000, RW)]       # inside the first: never used
    assert translation_ranges(maps) == [(0x1000, 0x2000, 0xA000, RO), (0x3000, 0x3000, 0xC800, RO)]
    assert translation_ranges([]) == []


def test_untranslated_turns_out_of_range_buffers_into_iova_untranslated():
    a = [Anomaly(AnomalyKind.ADDR_OUT_OF_RANGE, "desc 3 addr 0x1234 len 64 outside guest memory", 3),
         Anomaly(AnomalyKind.LOOP, "loop", 1)]
    out = untranslated(a)
    assert [x.kind for x in out] == [AnomalyKind.IOVA_UNTRANSLATED, AnomalyKind.LOOP]
    assert out[0].head == 3 and "0x1234" in out[0].detail and "device-IOTLB" in out[0].detail


def test_iotlb_offsets_from_debian_61_btf():
    """The walk's offsets (struct vhost_iotlb, vhost_iotlb_map, vq->iotlb)
    from the saved BTF equal what the 6.1 guest's own BTF said (measured:
    list 16, limit 32, flags 40; map link 24, start 40, last 48, addr 64,
    perm 72); without BTF the walk is compiled out."""
    base = Btf.load(DATA / f"vmlinux-{VER}.btf.xz")
    d = iotlb_offsets(Btf.load(DATA / f"vhost-{VER}.btf", base))
    assert d["HAVE_IOTLB_BTF"] is True
    assert (d["IOTLB_LIST_OFF"], d["IOTLB_LIMIT_OFF"], d["IOTLB_FLAGS_OFF"]) == (16, 32, 40)
    assert (d["MAP_LINK_OFF"], d["MAP_START_OFF"], d["MAP_LAST_OFF"], d["MAP_ADDR_OFF"], d["MAP_PERM_OFF"]) == \
        (24, 40, 48, 64, 72)
    assert d["VQ_IOTLB_SIZE"] == 8 and d["MAP_PERM_SIZE"] == 4
    none = iotlb_offsets(None)
    assert none["HAVE_IOTLB_BTF"] is False and none["MAP_START_OFF"] == 0


# ------------------------------------------------------------ a queue entry through the IOTLB

class _FakeProbe:
    """What VhostNetSource asks the vhost_net probe about the IOTLB."""

    def __init__(self, mirrors):
        self.mirrors = mirrors

    def iotlb(self, address):
        return self.mirrors.get(address)

    def iotlb_lost(self):
        return 0


IOVA = 0x1_0000_0000
IOTLB_ADDR = 0xFFFF_8880_0000_4000


@pytest.fixture
def iova_ring():
    """A driver-side split ring in this process's memory whose ring and
    buffer addresses are IOVAs (gpa + IOVA), like `load vhost-net --iotlb`."""
    from inspector.memory import GuestMemory
    from inspector.ring.driver import DriverRing

    size = 1 << 16
    m = mmap.mmap(-1, size)
    c = (ctypes.c_char * size).from_buffer(m)
    uva = ctypes.addressof(c)
    del c
    mem = GuestMemory()
    mem.add(0, m, uva=uva, size=size)
    ring = DriverRing(mem, 0, 16)
    yield ring, uva, size
    ring._view.release()
    del ring, mem
    m.close()


def _entry(ring, uva, mirror, **kw):
    from inspector.memory.process import ProcessMemory
    from inspector.sources.vhost_net import VhostNetSource
    from probes.vhost_net import VhostVqState

    src = object.__new__(VhostNetSource)
    src.pid = os.getpid()
    src._pmem = ProcessMemory(os.getpid())
    src.probe = _FakeProbe({IOTLB_ADDR: mirror})
    st = dict(vq=0xFFFF888000001000, owner_pid=os.getpid(), index=1, num=ring.size,
              desc=IOVA + ring.desc_addr, avail=IOVA + ring.avail_addr, used=IOVA + ring.used_addr,
              last_avail_idx=0, avail_idx=0, last_used_idx=0, used_flags=0, signalled_used=0,
              signalled_used_valid=False, notify_enabled=True,
              time_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC), acked_features=1 << 33, iotlb=IOTLB_ADDR)
    st.update(kw)
    try:
        return src._entry("vhost-net:1:5", None, VhostVqState(**st), {}, {})
    finally:
        src._pmem.close()


def test_entry_reads_the_ring_and_buffers_through_the_iotlb(iova_ring):
    """Page-granular maps of the ring and of one buffer page: the ring is
    read at the translated user addresses, the mapped buffer is fine, the
    buffer at an IOVA with no map is iova_untranslated (not
    addr_out_of_range), and the extras say where each area went. Without
    the memory table there is no mem_table_unknown: it does not translate
    here."""
    ring, uva, size = iova_ring
    ring.add_chain([(IOVA + 0x8000, 100, False)])                       # mapped below
    ring.add_chain([(IOVA + 0x9000, 64, False), (IOVA + 0xA000, 64, True)])  # 0xA000 never mapped
    ring.publish()
    m = IotlbMirror()
    for page in range(0, 0x2000, PAGE):                                    # the ring: 2 pages
        m.apply(IotlbOp(OP_SEEN, IOTLB_ADDR, IOVA + page, IOVA + page + PAGE - 1, uva + page, RW))
    for page in (0x8000, 0x9000):
        m.apply(IotlbOp(OP_ADD, IOTLB_ADDR, IOVA + page, IOVA + page + PAGE - 1, uva + page, RO))
    e = _entry(ring, uva, m, avail_idx=2)
    assert (e.avail_idx, e.used_idx, e.inflight) == (2, 0, 2)
    assert [ch.descs[0].addr for ch in e.chains] == [IOVA + 0x8000, IOVA + 0x9000]
    assert [a.kind for a in e.anomalies] == [AnomalyKind.IOVA_UNTRANSLATED], e.anomalies
    assert f"{IOVA + 0xA000:#x}" in e.anomalies[0].detail
    io = e.extras["iotlb"]
    assert (io["entries"], io["ranges"], io["source"], io["walked"], io["complete"]) == (4, 2, "probe", True, True)
    assert io["ring"]["desc"] == {"iova": IOVA + ring.desc_addr, "uaddr": uva + ring.desc_addr, "perm": "rw"}
    assert io["ring"]["used"]["uaddr"] == uva + ring.used_addr


def test_entry_with_a_ring_area_unmapped_is_said_untranslated_not_read(iova_ring):
    """The used ring's page was invalidated (or never updated): one
    iova_untranslated naming the area and its IOVA, no chains (nothing read
    as garbage), no ring_unmapped."""
    ring, uva, size = iova_ring
    ring.add_chain([(IOVA + 0x8000, 100, False)])
    ring.publish()
    m = IotlbMirror()
    for page in range(0, 0x2000, PAGE):
        m.apply(IotlbOp(OP_ADD, IOTLB_ADDR, IOVA + page, IOVA + page + PAGE - 1, uva + page, RW))
    m.apply(IotlbOp(OP_DEL, IOTLB_ADDR, IOVA + ring.used_addr, IOVA + ring.used_addr))
    e = _entry(ring, uva, m, avail_idx=1)
    assert [a.kind for a in e.anomalies] == [AnomalyKind.IOVA_UNTRANSLATED]
    assert f"used at IOVA {IOVA + ring.used_addr:#x}" in e.anomalies[0].detail
    assert not e.chains and e.extras["iotlb"]["ring"]["used"]["uaddr"] is None
    # a vring whose IOTLB the probes never saw says so too
    e = _entry(ring, uva, None, avail_idx=1)
    assert [a.kind for a in e.anomalies] == [AnomalyKind.IOVA_UNTRANSLATED]
    assert "not read yet" in e.anomalies[0].detail and e.extras["iotlb"]["entries"] == 0


def test_ring_area_across_maps_of_two_permissions_is_translated():
    """An area spanning two maps contiguous in both spaces is translated
    (one RamRange), its perm the access both grant."""
    from inspector.sources.vhost_net import iotlb_extras

    m = IotlbMirror()
    m.add(0x1000, 0x1FFF, 0xA000, RO)
    m.add(0x2000, 0x2FFF, 0xB000, RW)
    ranges = translation_ranges(m.maps())
    assert len(ranges) == 2
    x = iotlb_extras(m, ranges, [(0x1F00, 0x200), (0x2100, 0x10), (0x2F00, 0x200)], 0)
    assert x["ring"]["desc"] == {"iova": 0x1F00, "uaddr": 0xAF00, "perm": "ro"}
    assert x["ring"]["avail"] == {"iova": 0x2100, "uaddr": 0xB100, "perm": "rw"}
    assert x["ring"]["used"] == {"iova": 0x2F00, "uaddr": None, "perm": None}   # runs past the last map
    assert (x["entries"], x["complete"], x["walked"]) == (2, True, False)
    assert iotlb_extras(m, ranges, [], 3)["complete"] is False                      # records lost
