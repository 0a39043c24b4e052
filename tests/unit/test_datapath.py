"""The C data path (csrc/vqd_vq.c, vqd_net.c) driven directly, without vhost-user.

(Over 600 lines: the split queue's and the net paths' tests share the Rig
and NetRig builders here; the packed ring's are in test_datapath_packed.py,
the IOTLB's in test_iotlb.py.)

Rings are built with inspector.ring.driver.DriverRing in a GuestMemory over
bytearrays; the device side is inspector.datapath.queue.DeviceQueue. Hostile rings
quote the VIRTIO 1.2 rule they break and must mark the queue broken quickly
(never hang, never crash).
"""

from __future__ import annotations

import os
import struct

import pytest

from inspector.ring.driver import DriverRing
from inspector.spec.virtio import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                   VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY)
from inspector.errors import RingError
from inspector.memory import GuestMemory
from inspector.datapath.net import NetScratch, net_loopback
from inspector.datapath.queue import FAULT_DROP_CALLS, FAULT_STALL, DeviceQueue, need_event

GPA = 0x100000          # guest-physical base of the test memory
UVA = 0x7F0000000000    # the front-end's virtual address of the same memory
MEM_SIZE = 1 << 20
RING = GPA              # ring at the start of memory
DATA = GPA + 0x10000    # buffers from here on


class Rig:
    """A driver ring and the device queue servicing it."""

    def __init__(self, size=8, *, event_idx=False, call_fd=-1, kick_fd=-1, base_idx=0, mem=None):
        if mem is None:
            mem = GuestMemory()
            mem.add(GPA, bytearray(MEM_SIZE), uva=UVA)
        self.mem = mem
        self.drv = DriverRing(mem, RING, size)
        if base_idx:
            self.drv.set_avail_idx(base_idx)
            self.drv.last_used_idx = base_idx
            struct.pack_into("<H", self.drv._view, self.drv.layout.used_offset + 2, base_idx)
        to_uva = lambda gpa: gpa - GPA + UVA  # noqa: E731
        self.dev = DeviceQueue(mem, size, to_uva(self.drv.desc_addr), to_uva(self.drv.avail_addr),
                               to_uva(self.drv.used_addr), last_avail_idx=base_idx,
                               event_idx=event_idx, call_fd=call_fd, kick_fd=kick_fd)

    def write(self, gpa, data):
        self.mem.view(gpa, len(data))[:] = data

    def read(self, gpa, n):
        return self.mem.read(gpa, n)


# --- pop / push -------------------------------------------------------------

def test_pop_push_round_trip():
    rig = Rig()
    rig.write(DATA, b"hello device")
    head = rig.drv.add_chain([(DATA, 12, False), (DATA + 0x100, 64, True)])
    rig.drv.publish()
    chains = rig.dev.pop()
    assert len(chains) == 1
    c = chains[0]
    assert c.head == head and c.out_len == 12 and c.in_len == 64
    assert bytes(c.out[0]) == b"hello device"
    c.in_[0][:5] = b"reply"
    assert rig.dev.push([(head, 5)]) == 1
    assert rig.drv.get_used() == [(head, 5)]
    assert rig.read(DATA + 0x100, 5) == b"reply"
    assert rig.dev.last_avail_idx == 1 and rig.dev.used_idx == 1
    assert rig.dev.pop() == []


def test_guarded_read_and_write_copy_across_iovecs():
    rig = Rig()
    rig.write(DATA, b"hello ")
    rig.write(DATA + 0x40, b"device")
    head = rig.drv.add_chain([(DATA, 6, False), (DATA + 0x40, 6, False),
                              (DATA + 0x100, 4, True), (DATA + 0x200, 64, True)])
    rig.drv.publish()
    (c,) = rig.dev.pop()
    assert rig.dev.read(c) == b"hello device" and rig.dev.read(c, max_bytes=8) == b"hello de"
    assert rig.dev.write(c, b"0123456789") == 10
    assert rig.read(DATA + 0x100, 4) == b"0123" and rig.read(DATA + 0x200, 6) == b"456789"
    assert rig.dev.write(c, bytes(100)) == 68     # at most in_len


def test_guarded_read_of_truncated_memory_breaks_the_queue():
    """A front-end that shrinks its memfd after the chains were popped: the
    Python-side copy faults inside the guard, the queue is broken naming
    the guest-physical address, and this process goes on."""
    import mmap

    fd = os.memfd_create("vqscope-test")
    try:
        os.ftruncate(fd, MEM_SIZE)
        m = mmap.mmap(fd, MEM_SIZE)
        mem = GuestMemory()
        mem.add(GPA, m, uva=UVA)
        rig = Rig(mem=mem)
        far = GPA + MEM_SIZE - 0x1000             # in the half about to go
        rig.write(far, b"x" * 64)
        head = rig.drv.add_chain([(far, 64, False), (far + 0x100, 64, True)])
        rig.drv.publish()
        (c,) = rig.dev.pop()
        assert c.head == head
        os.ftruncate(fd, MEM_SIZE // 2)
        with pytest.raises(RingError, match=r"SIGBUS at guest-physical 0x%x" % far):
            rig.dev.read(c)
        assert "memfd truncated" in rig.dev.broken
        with pytest.raises(RingError, match="broken"):
            rig.dev.write(c, b"y")
    finally:
        rig.dev.release()
        os.close(fd)


def test_pop_burst_and_rewind():
    rig = Rig(size=8)
    heads = [rig.drv.add_chain([(DATA + 0x100 * i, 16, False)]) for i in range(5)]
    rig.drv.publish()
    first = rig.dev.pop(max_chains=3)
    assert [c.head for c in first] == heads[:3]
    rig.dev.rewind(1)
    rest = rig.dev.pop(max_chains=8)
    assert [c.head for c in rest] == heads[2:]
    rig.dev.push([(h, 0) for h in heads])
    assert [h for h, _ in rig.drv.get_used()] == heads


def test_pop_stops_at_iov_capacity_without_consuming():
    rig = Rig(size=8)
    h1 = rig.drv.add_chain([(DATA, 16, False), (DATA + 0x100, 16, False)])
    h2 = rig.drv.add_chain([(DATA + 0x200, 16, False), (DATA + 0x300, 16, False)])
    rig.drv.publish()
    got = rig.dev.pop(max_chains=8, max_iov=3)
    assert [c.head for c in got] == [h1]
    assert [c.head for c in rig.dev.pop(max_chains=8, max_iov=3)] == [h2]


def test_indirect_chain():
    rig = Rig()
    rig.write(DATA, b"A" * 8)
    head = rig.drv.add_indirect_chain(DATA + 0x8000, [(DATA, 8, False), (DATA + 0x100, 32, True)])
    rig.drv.publish()
    (c,) = rig.dev.pop()
    assert c.head == head and c.out_len == 8 and c.in_len == 32
    assert bytes(c.out[0]) == b"A" * 8


def test_zero_length_descriptor_gives_no_iovec():
    rig = Rig()
    rig.drv.add_chain([(DATA, 0, False), (DATA + 0x10, 4, True)])
    rig.drv.publish()
    (c,) = rig.dev.pop()
    assert (len(c.out), len(c.in_), c.in_len) == (0, 1, 4)


def test_gpa_ring_addresses():
    mem = GuestMemory()
    mem.add(GPA, bytearray(MEM_SIZE))  # uva == gpa
    drv = DriverRing(mem, RING, 4)
    dev = DeviceQueue(mem, 4, drv.desc_addr, drv.avail_addr, drv.used_addr, gpa=True)
    drv.add_chain([(DATA, 4, True)])
    drv.publish()
    assert len(dev.pop()) == 1


def test_used_index_wraps_at_2_16():
    rig = Rig(size=4, base_idx=0xFFFE)
    for round_ in range(4):
        h = rig.drv.add_chain([(DATA, 4, True)])
        rig.drv.publish()
        (c,) = rig.dev.pop()
        rig.dev.push([(c.head, round_)])
        assert rig.drv.get_used() == [(h, round_)]
    assert rig.dev.last_avail_idx == 2 and rig.dev.used_idx == 2


def test_ring_outside_memory_is_refused():
    mem = GuestMemory()
    mem.add(GPA, bytearray(MEM_SIZE), uva=UVA)
    from inspector.errors import MemoryAccessError
    with pytest.raises(MemoryAccessError):
        DeviceQueue(mem, 8, UVA + MEM_SIZE - 16, UVA, UVA + 0x1000)


# --- region clamping -----------------------------------------------------------

def test_buffer_crossing_two_regions_gives_two_iovecs():
    """Regions are adjacent in guest-physical space but separate buffers
    (two memfds): a buffer across the boundary maps to one iovec per region."""
    mem = GuestMemory()
    a, b = bytearray(0x40000), bytearray(0x10000)
    mem.add(GPA, a, uva=UVA)
    mem.add(GPA + 0x40000, b, uva=UVA + 0x100000)
    rig = Rig(mem=mem)
    start = GPA + 0x40000 - 0x30
    a[-0x30:] = b"x" * 0x30
    b[:0x20] = b"y" * 0x20
    rig.drv.add_chain([(start, 0x50, False)])
    rig.drv.publish()
    (c,) = rig.dev.pop()
    assert [len(v) for v in c.out] == [0x30, 0x20]
    assert b"".join(bytes(v) for v in c.out) == b"x" * 0x30 + b"y" * 0x20
    assert c.out_len == 0x50


# --- hostile chains ------------------------------------------------------------

def _hostile(rig):
    rig.drv.publish()
    with pytest.raises(RingError):
        rig.dev.pop()
    assert rig.dev.broken
    return rig.dev.broken


@pytest.mark.timeout(10)
def test_descriptor_loop_marks_broken():
    """§2.7.5.2: a chain is never longer than the Queue Size; 0 -> 1 -> 0 loops."""
    rig = Rig(size=8)
    rig.drv.write_desc(0, DATA, 16, VRING_DESC_F_NEXT, 1)
    rig.drv.write_desc(1, DATA, 16, VRING_DESC_F_NEXT, 0)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "loops" in _hostile(rig)


@pytest.mark.timeout(10)
def test_self_loop_in_indirect_table_marks_broken():
    rig = Rig(size=8)
    table = DATA + 0x8000
    rig.mem.view(table, 16)[:] = struct.pack("<QIHH", DATA, 16, VRING_DESC_F_NEXT, 0)
    rig.drv.write_desc(0, table, 16, VRING_DESC_F_INDIRECT, 0)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "loops" in _hostile(rig)


def test_next_out_of_range_marks_broken():
    """§2.7.5: next indexes the descriptor table (< Queue Size)."""
    rig = Rig(size=8)
    rig.drv.write_desc(0, DATA, 16, VRING_DESC_F_NEXT, 8)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "next 8" in _hostile(rig)


def test_head_out_of_range_marks_broken():
    """§2.7.6: avail->ring holds heads of descriptor chains (< Queue Size)."""
    rig = Rig(size=8)
    rig.drv.set_avail_ring(0, 9)
    rig.drv.avail_idx = 1
    assert "head 9" in _hostile(rig)


def test_buffer_outside_memory_marks_broken():
    """§2.7.5: addr is a guest-physical address; this one is in no region."""
    rig = Rig()
    rig.drv.add_chain([(GPA + MEM_SIZE + 0x1000, 64, False)])
    assert "outside guest memory" in _hostile(rig)


def test_buffer_running_past_memory_end_marks_broken():
    rig = Rig()
    rig.drv.add_chain([(GPA + MEM_SIZE - 8, 64, False)])
    assert "outside guest memory" in _hostile(rig)


def test_nested_indirect_marks_broken():
    """§2.7.5.3.1: the driver MUST NOT set VRING_DESC_F_INDIRECT within an indirect table."""
    rig = Rig()
    rig.drv.add_indirect_chain(DATA + 0x8000, [(DATA + 0x9000, 16, False)])
    # make the table's only entry point to another table
    rig.mem.view(DATA + 0x8000, 16)[:] = struct.pack("<QIHH", DATA + 0x9000, 16, VRING_DESC_F_INDIRECT, 0)
    assert "nested indirect" in _hostile(rig)


def test_indirect_with_next_marks_broken():
    """§2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT."""
    rig = Rig()
    rig.drv.write_desc(0, DATA + 0x8000, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "INDIRECT and VRING_DESC_F_NEXT" in _hostile(rig)


def test_indirect_bad_length_marks_broken():
    """§2.7.5.3: an indirect table is len / 16 descriptors."""
    rig = Rig()
    rig.drv.write_desc(0, DATA + 0x8000, 24, VRING_DESC_F_INDIRECT, 0)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "multiple of 16" in _hostile(rig)


def test_indirect_table_outside_memory_marks_broken():
    rig = Rig()
    rig.drv.write_desc(0, GPA + MEM_SIZE - 16, 32, VRING_DESC_F_INDIRECT, 0)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "indirect table" in _hostile(rig)


def test_readable_after_writable_marks_broken():
    """§2.7.4.2: device-writable descriptors come after device-readable ones."""
    rig = Rig()
    rig.drv.write_desc(0, DATA, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    rig.drv.write_desc(1, DATA + 0x100, 16, 0, 0)
    rig.drv.set_avail_ring(0, 0)
    rig.drv.avail_idx = 1
    assert "§2.7.4.2" in _hostile(rig)


def test_avail_idx_jump_marks_broken():
    """§2.7.6: no more than Queue Size buffers can be available at once."""
    rig = Rig(size=8)
    rig.drv.set_avail_idx(9)
    with pytest.raises(RingError):
        rig.dev.pop()
    assert "more than the queue size" in rig.dev.broken


def test_broken_queue_refuses_further_work():
    rig = Rig()
    rig.drv.add_chain([(GPA + MEM_SIZE * 2, 4, False)])
    _hostile(rig)
    with pytest.raises(RingError):
        rig.dev.push([(0, 0)])
    with pytest.raises(RingError):
        rig.dev.pop()


def test_good_chains_before_a_bad_one_are_returned():
    rig = Rig()
    good = rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.add_chain([(GPA + MEM_SIZE * 2, 4, False)])
    rig.drv.publish()
    assert [c.head for c in rig.dev.pop()] == [good]
    assert rig.dev.broken and rig.dev.last_avail_idx == 1


# --- notifications -------------------------------------------------------------

@pytest.mark.parametrize("event,new,old,expected", [
    (0, 1, 0, True),         # driver wants a call once used->idx passes 0
    (0, 0, 0, False),        # nothing new
    (1, 1, 0, False),        # event 1 not yet passed by new=1
    (1, 2, 0, True),
    (5, 10, 6, False),       # event behind old: already signalled
    (6, 10, 6, True),        # event == old: it is in [old, new)
    (9, 10, 6, True),        # event == new - 1
    (10, 10, 6, False),      # event == new: not yet
    (0xFFFF, 1, 0xFFFE, True),  # wrap: [0xfffe, 1) contains 0xffff
    (0, 1, 0xFFFE, True),       # wrap: contains 0
    (1, 1, 0xFFFE, False),
    (0x8000, 0x8001, 0x7FFF, True),
])
def test_need_event(event, new, old, expected):
    assert need_event(event, new, old) is expected


def _eventfd_value(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def call_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def _use_one(rig):
    rig.drv.add_chain([(DATA, 4, True)])
    rig.drv.publish()
    (c,) = rig.dev.pop()
    rig.dev.push([(c.head, 4)])
    rig.drv.get_used()


def test_no_interrupt_flag_suppresses_calls(call_fd):
    """§2.7.7 (no EVENT_IDX): VRING_AVAIL_F_NO_INTERRUPT asks the device not to call."""
    rig = Rig(call_fd=call_fd)
    _use_one(rig)
    assert rig.dev.notify() is True and _eventfd_value(call_fd) == 1
    rig.drv.avail_flags = VRING_AVAIL_F_NO_INTERRUPT
    _use_one(rig)
    assert rig.dev.notify() is False and _eventfd_value(call_fd) == 0
    c = rig.dev.counters
    assert (c["calls"], c["calls_suppressed"]) == (1, 1)


def test_event_idx_used_event_decides_calls(call_fd):
    """§2.7.10: with EVENT_IDX the device calls when used->idx passes used_event."""
    rig = Rig(size=16, event_idx=True, call_fd=call_fd)
    rig.drv.avail_flags = VRING_AVAIL_F_NO_INTERRUPT  # ignored with EVENT_IDX
    rig.drv.used_event = 0
    _use_one(rig)                      # used 0 -> 1: first signal always
    assert rig.dev.notify() is True
    rig.drv.used_event = 3             # "call me when entry 3 is used"
    _use_one(rig)                      # 1 -> 2
    assert rig.dev.notify() is False
    _use_one(rig)                      # 2 -> 3
    assert rig.dev.notify() is False
    _use_one(rig)                      # 3 -> 4: passes 3
    assert rig.dev.notify() is True
    _use_one(rig)                      # 4 -> 5, used_event still 3: already signalled
    assert rig.dev.notify() is False
    assert _eventfd_value(call_fd) == 2
    assert rig.dev.counters["calls"] == 2 and rig.dev.counters["calls_suppressed"] == 3


def test_event_idx_batched_push_passing_used_event(call_fd):
    rig = Rig(size=16, event_idx=True, call_fd=call_fd)
    _use_one(rig)
    rig.dev.notify()
    rig.drv.used_event = 2
    heads = [rig.drv.add_chain([(DATA, 4, True)]) for _ in range(3)]
    rig.drv.publish()
    rig.dev.pop()
    rig.dev.push([(h, 0) for h in heads])   # used 1 -> 4 in one step passes 2
    assert rig.dev.notify() is True


def test_kick_suppression_flag_without_event_idx():
    """§2.7.10: VRING_USED_F_NO_NOTIFY tells the driver not to kick."""
    rig = Rig()
    assert rig.dev.set_notification(False) == 0
    assert rig.drv.used_flags & VRING_USED_F_NO_NOTIFY
    assert rig.dev.set_notification(True) == 0
    assert not rig.drv.used_flags & VRING_USED_F_NO_NOTIFY


def test_enable_notification_reports_pending_buffers():
    """Closing the race: buffers added while kicks were off are reported on enable."""
    rig = Rig()
    rig.dev.set_notification(False)
    rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.publish()
    assert rig.dev.set_notification(True) == 2


def test_avail_event_with_event_idx():
    """§2.7.10: with EVENT_IDX, avail_event = last_avail_idx asks for the next kick."""
    rig = Rig(size=8, event_idx=True)
    for _ in range(3):
        rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.publish()
    rig.dev.set_notification(False)
    rig.dev.pop()
    assert rig.drv.avail_event == 0          # stale while polling
    assert rig.dev.set_notification(True) == 0
    assert rig.drv.avail_event == 3
    assert rig.drv.used_flags == 0           # flags untouched with EVENT_IDX


def test_drain_kick_counts_eventfd_value():
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rig = Rig(kick_fd=kick)
        os.eventfd_write(kick, 3)
        assert rig.dev.drain_kick() == 3
        assert rig.dev.drain_kick() == 0
        assert rig.dev.counters["kicks"] == 3
    finally:
        os.close(kick)


# --- faults on purpose (inspector/faults.py) -------------------------------------

def test_stalled_queue_pops_nothing_and_notice_reads_avail_idx():
    """FAULT_STALL: nothing is taken; notice() reads avail->idx (the
    shadow moves) and asks for the next kick at it, as Linux
    vhost_enable_notify (avail_event = the avail_idx read, §2.7.10)."""
    rig = Rig(size=8, event_idx=True)
    rig.dev.set_notification(False)
    rig.dev.fault = FAULT_STALL
    for _ in range(3):
        rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.publish()
    assert rig.dev.pop() == [] and rig.dev.shadow_avail_idx == 0
    assert rig.dev.notice() == 3
    assert rig.dev.shadow_avail_idx == 3 and rig.dev.last_avail_idx == 0
    assert rig.drv.avail_event == 3          # not last_avail_idx: the next publish kicks
    rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.publish()
    assert need_event(rig.drv.avail_event, 4, 3)
    rig.dev.fault = 0
    assert len(rig.dev.pop()) == 4


def test_notice_without_event_idx_clears_no_notify():
    rig = Rig()
    rig.dev.set_notification(False)
    rig.drv.add_chain([(DATA, 4, False)])
    rig.drv.publish()
    assert rig.dev.notice() == 1
    assert not rig.drv.used_flags & VRING_USED_F_NO_NOTIFY and rig.dev.shadow_avail_idx == 1


def test_dropped_call_is_decided_but_not_written(call_fd):
    """FAULT_DROP_CALLS: the call is decided as ever (§2.7.10, signalled_used
    moves) but not written, counted or logged as a call: a lost interrupt.
    The driver, never called, leaves used_event where it was, so later
    calls are not due at all."""
    rig = Rig(size=16, event_idx=True, call_fd=call_fd)
    rig.dev.fault = FAULT_DROP_CALLS
    rig.drv.used_event = 0
    _use_one(rig)                           # used 0 -> 1: due (first signal), dropped
    assert rig.dev.notify() is False and _eventfd_value(call_fd) == 0
    rig.drv.used_event = 1
    _use_one(rig)                           # 1 -> 2: passes used_event 1: due, dropped
    assert rig.dev.notify() is False
    _use_one(rig)                           # 2 -> 3: used_event 1 already passed
    assert rig.dev.notify() is False
    c = rig.dev.counters
    assert (c["calls"], c["calls_dropped"], c["calls_suppressed"]) == (0, 2, 1)
    rig.dev.fault = 0
    rig.drv.used_event = 3
    _use_one(rig)                           # 3 -> 4 passes 3: called
    assert rig.dev.notify() is True and _eventfd_value(call_fd) == 1


# --- net fast path ---------------------------------------------------------------

HDR12 = 12
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


class NetRig:
    """TX and RX rings in one memory; the device moves frames TX -> RX."""

    def __init__(self, size=16):
        self.mem = GuestMemory()
        self.mem.add(GPA, bytearray(4 << 20), uva=UVA)
        self.tx = DriverRing(self.mem, GPA, size)
        self.rx = DriverRing(self.mem, GPA + 0x10000, size)
        self.txq = DeviceQueue(self.mem, size, self.tx.desc_addr, self.tx.avail_addr,
                               self.tx.used_addr, gpa=True)
        self.rxq = DeviceQueue(self.mem, size, self.rx.desc_addr, self.rx.avail_addr,
                               self.rx.used_addr, gpa=True)
        self.s = NetScratch()
        self.next_buf = GPA + 0x100000

    def alloc(self, n):
        a = self.next_buf
        self.next_buf += (n + 0xFFF) & ~0xFFF
        return a

    def send(self, frame: bytes, hdr: bytes = bytes(HDR12), split_at: int | None = None):
        a = self.alloc(len(hdr) + len(frame))
        self.mem.view(a, len(hdr) + len(frame))[:] = hdr + frame
        if split_at is None:
            self.tx.add_chain([(a, len(hdr) + len(frame), False)])
        else:  # header in its own descriptor, as Linux does
            self.tx.add_chain([(a, split_at, False), (a + split_at, len(hdr) + len(frame) - split_at, False)])
        self.tx.publish()

    def give_rx(self, size: int, count: int = 1, pieces: list[int] | None = None):
        addrs = []
        for _ in range(count):
            a = self.alloc(size)
            if pieces:
                bufs, off = [], 0
                for p in pieces:
                    bufs.append((a + off, p, True))
                    off += p
                self.rx.add_chain(bufs)
            else:
                self.rx.add_chain([(a, size, True)])
            addrs.append(a)
        self.rx.publish()
        return addrs

    def run(self, mrg=True, budget=64):
        return net_loopback(self.txq, self.rxq, self.s, HDR12, mrg, budget)


def _eth(n):
    body = bytes((i * 7) & 0xFF for i in range(n - 14))
    return MAC_A + MAC_B + b"\x08\x00" + body


def test_loopback_swaps_macs_and_counts():
    rig = NetRig()
    bufs = rig.give_rx(2048, 2)
    rig.send(_eth(64))
    rig.send(_eth(100), split_at=HDR12)
    assert rig.run() == 2
    used = rig.rx.get_used()
    assert [n for _, n in used] == [HDR12 + 64, HDR12 + 100]
    for (addr, n) in zip(bufs, (64, 100)):
        hdr = rig.mem.read(addr, HDR12)
        assert hdr == bytes(10) + b"\x01\x00"   # num_buffers = 1
        frame = rig.mem.read(addr + HDR12, n)
        assert frame == MAC_B + MAC_A + _eth(n)[12:]
    assert [n for _, n in rig.tx.get_used()] == [0, 0]
    assert rig.txq.counters["packets"] == 2 and rig.txq.counters["bytes"] == 164
    assert rig.rxq.counters["packets"] == 2 and rig.rxq.counters["bytes"] == 164


def test_loopback_mergeable_frame_spans_chains():
    """§5.1.6.4.2: with MRG_RXBUF a frame spans chains; num_buffers counts them."""
    rig = NetRig()
    bufs = rig.give_rx(256, 6)
    frame = _eth(1000)
    rig.send(frame)
    assert rig.run(mrg=True) == 1
    used = rig.rx.get_used()
    assert len(used) == 4                               # ceil((12 + 1000) / 256)
    assert sum(n for _, n in used) == HDR12 + 1000
    assert rig.mem.read(bufs[0] + 10, 2) == b"\x04\x00"
    data = b"".join(rig.mem.read(a, n) for a, (_, n) in zip(bufs, used))
    assert data[HDR12:] == MAC_B + MAC_A + frame[12:]


def test_loopback_without_mrg_drops_frame_too_big_for_one_chain():
    rig = NetRig()
    rig.give_rx(256, 2)
    rig.send(_eth(1000))
    rig.send(_eth(60))
    assert rig.run(mrg=False) == 2
    assert [n for _, n in rig.rx.get_used()] == [HDR12 + 60]  # the small one, in the first chain
    assert rig.rxq.counters["drops"] == 1
    assert rig.rxq.last_avail_idx == 1
    assert len(rig.tx.get_used()) == 2


def test_loopback_rx_starved_drops_frame_and_returns_tx():
    """A NIC (and tun under vhost-net) drops a frame it has no receive
    buffer for; the TX buffer goes back and RX counts the drop."""
    rig = NetRig()
    rig.send(_eth(64))
    rig.send(_eth(64))
    assert rig.run() == 2
    assert rig.s.rx_starved
    assert rig.txq.last_avail_idx == 2 and len(rig.tx.get_used()) == 2
    assert rig.rxq.counters["drops"] == 2 and rig.rx.get_used() == []
    assert rig.txq.counters["packets"] == 2 and rig.txq.counters["drops"] == 0
    rig.give_rx(2048, 1)
    rig.send(_eth(64))
    assert rig.run() == 1 and not rig.s.rx_starved
    assert len(rig.rx.get_used()) == 1 and rig.rxq.counters["drops"] == 2


def test_loopback_partial_mergeable_starvation_drops_and_takes_nothing():
    """Too few RX buffers for a mergeable frame: the chains taken for it go
    back, the frame is dropped."""
    rig = NetRig()
    rig.give_rx(256, 2)
    rig.send(_eth(1000))
    assert rig.run(mrg=True) == 1 and rig.s.rx_starved
    assert rig.rxq.last_avail_idx == 0 and rig.rx.get_used() == []
    assert rig.rxq.counters["drops"] == 1 and len(rig.tx.get_used()) == 1
    rig.give_rx(256, 2)
    rig.send(_eth(1000))
    assert rig.run(mrg=True) == 1
    assert len(rig.rx.get_used()) == 4


def test_loopback_stalled_rx_drops_without_reading_avail():
    """FAULT_STALL on RX: frames for it are dropped; the stalled queue takes
    no buffer and does not even read avail->idx (only notice() does)."""
    rig = NetRig()
    rig.give_rx(2048, 4)
    rig.rxq.fault = FAULT_STALL
    rig.send(_eth(64))
    assert rig.run() == 1
    assert rig.rxq.counters["drops"] == 1 and rig.rx.get_used() == []
    assert rig.rxq.last_avail_idx == 0 and rig.rxq.shadow_avail_idx == 0
    assert rig.rxq.notice() == 4 and rig.rxq.shadow_avail_idx == 4
    rig.rxq.fault = 0
    rig.send(_eth(64))
    assert rig.run() == 1 and len(rig.rx.get_used()) == 1


def test_loopback_rx_header_split_across_descriptors():
    rig = NetRig()
    (addr,) = rig.give_rx(0, 1, pieces=[5, 4, 2048])
    rig.send(_eth(64))
    assert rig.run(mrg=True) == 1
    assert rig.mem.read(addr, HDR12) == bytes(10) + b"\x01\x00"
    assert rig.mem.read(addr + HDR12, 64) == MAC_B + MAC_A + _eth(64)[12:]


def test_loopback_short_tx_chain_is_dropped_not_fatal():
    rig = NetRig()
    rig.give_rx(2048, 1)
    a = rig.alloc(16)
    rig.tx.add_chain([(a, 8, False)])   # shorter than the header
    rig.tx.publish()
    assert rig.run() == 1
    assert rig.txq.counters["drops"] == 1 and rig.rx.get_used() == []
    assert len(rig.tx.get_used()) == 1


def test_loopback_rx_chain_without_writable_part_breaks_rx_only():
    """§5.1.6.3.1: receive buffers are device-writable. A broken RX breaks
    only itself: TX goes on, its frames lost on the receive side."""
    rig = NetRig()
    a = rig.alloc(64)
    rig.rx.add_chain([(a, 64, False)])
    rig.rx.publish()
    rig.send(_eth(64))
    assert rig.run() == 1
    assert "virtio_net_hdr" in rig.rxq.broken and rig.txq.broken is None
    assert len(rig.tx.get_used()) == 1 and rig.rxq.counters["drops"] == 1
    rig.send(_eth(64))                   # and the next call still serves TX
    assert rig.run() == 1 and len(rig.tx.get_used()) == 1 and rig.rxq.counters["drops"] == 2


def test_loopback_budget_and_many_frames():
    rig = NetRig(size=256)
    rig.give_rx(2048, 200)
    for i in range(200):
        rig.send(_eth(64 + i))
    assert rig.run(budget=50) == 50
    assert rig.run(budget=1000) == 150
    used = rig.rx.get_used()
    assert [n - HDR12 for _, n in used] == [64 + i for i in range(200)]
    assert rig.rxq.counters["bytes"] == sum(64 + i for i in range(200))


def test_loopback_legacy_10_byte_header():
    """§5.1.6.1: without VERSION_1 and MRG_RXBUF the header has no num_buffers."""
    rig = NetRig()
    (addr,) = rig.give_rx(2048, 1)
    rig.mem.view(addr, 16)[:] = b"\xee" * 16
    a = rig.alloc(10 + 64)
    rig.mem.view(a, 74)[:] = bytes(10) + _eth(64)
    rig.tx.add_chain([(a, 74, False)])
    rig.tx.publish()
    assert net_loopback(rig.txq, rig.rxq, rig.s, 10, False, 64) == 1
    assert rig.rx.get_used()[0][1] == 10 + 64
    assert rig.mem.read(addr, 10) == bytes(10)
    assert rig.mem.read(addr + 10, 64) == MAC_B + MAC_A + _eth(64)[12:]


def test_loopback_indirect_tx_and_rx_chains():
    rig = NetRig()
    rx_buf = rig.alloc(2048)
    rig.rx.add_indirect_chain(rig.alloc(64), [(rx_buf, 12, True), (rx_buf + 12, 2000, True)])
    rig.rx.publish()
    a = rig.alloc(12 + 64)
    rig.mem.view(a, 76)[:] = bytes(12) + _eth(64)
    rig.tx.add_indirect_chain(rig.alloc(64), [(a, 12, False), (a + 12, 64, False)])
    rig.tx.publish()
    assert rig.run() == 1
    assert rig.mem.read(rx_buf + 12, 64) == MAC_B + MAC_A + _eth(64)[12:]
