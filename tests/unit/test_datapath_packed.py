"""The C packed-ring data path (csrc/vqd_pvq.c, the packed copy of
vqd_net_tmpl.h) driven through PackedDeviceQueue, without vhost-user.

Rings are built in a GuestMemory over a bytearray by :class:`PackedDriver`,
a minimal driver that follows VIRTIO 1.2 §2.8.21 (descriptors, then the
head's flags last; used descriptors read at its next_used, skipping each
buffer's slots). Hostile rings quote the rule they break and must break only
their own queue.
"""

from __future__ import annotations

import os
import struct

import pytest

from inspector.datapath.net import NetScratch, net_loopback
from inspector.datapath.packed_queue import PackedDeviceQueue, decode_vring_base, encode_vring_base
from inspector.datapath.queue import FAULT_STALL
from inspector.errors import ArgumentError, RingError
from inspector.memory import GuestMemory
from inspector.spec.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                                   VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)

GPA = 0x100000
UVA = 0x7F0000000000
MEM_SIZE = 4 << 20
DESC = struct.Struct("<QIHH")


class PackedDriver:
    """The driver side of a packed ring at ``base`` (descriptor ring, then
    the driver and the device event suppression areas, 4 bytes each)."""

    def __init__(self, mem: GuestMemory, base: int, size: int):
        self.mem, self.size = mem, size
        self.desc_addr = base
        self.driver_event_addr = base + 16 * size
        self.device_event_addr = self.driver_event_addr + 4
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.next_id = 0
        self.ndescs: dict[int, int] = {}

    def _avail_flags(self, wrap: int) -> int:
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    def write_desc(self, slot: int, addr: int, length: int, bid: int, flags: int) -> None:
        self.mem.view(self.desc_addr + 16 * slot, 16)[:] = DESC.pack(addr, length, bid, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.mem.read(self.desc_addr + 16 * slot, 16))

    def add_chain(self, bufs: list[tuple[int, int, bool]], *, bid: int | None = None,
                  extra_flags: int = 0) -> int:
        """Make ``bufs`` ``(gpa, len, device_writable)`` available as one
        buffer; the head's flags are written last. Returns its buffer id."""
        if bid is None:
            bid, self.next_id = self.next_id, (self.next_id + 1) % self.size
        slot, wrap = self.next_avail, self.avail_wrap
        head_slot, head_flags = slot, None
        for k, (addr, length, w) in enumerate(bufs):
            flags = self._avail_flags(wrap) | (VRING_DESC_F_WRITE if w else 0) | extra_flags
            if k < len(bufs) - 1:
                flags |= VRING_DESC_F_NEXT
            self.write_desc(slot, addr, length, bid, 0 if k == 0 else flags)
            if k == 0:
                head_flags = flags
            slot += 1
            if slot == self.size:
                slot, wrap = 0, wrap ^ 1
        struct.pack_into("<H", self.mem.view(self.desc_addr + 16 * head_slot + 14, 2), 0, head_flags)
        self.next_avail, self.avail_wrap = slot, wrap
        self.ndescs[bid] = len(bufs)
        return bid

    def add_indirect(self, table: int, bufs: list[tuple[int, int, bool]], *, table_flags=None,
                     ring_flags: int = 0) -> int:
        """One ring descriptor pointing at an indirect table of ``bufs`` at ``table``."""
        for k, (addr, length, w) in enumerate(bufs):
            f = (VRING_DESC_F_WRITE if w else 0) if table_flags is None else table_flags[k]
            self.mem.view(table + 16 * k, 16)[:] = DESC.pack(addr, length, 0, f)
        return self.add_chain([(table, 16 * len(bufs), False)], extra_flags=VRING_DESC_F_INDIRECT | ring_flags)

    def _next_used(self) -> tuple[int, int] | None:
        """``(id, len)`` of the used descriptor at next_used, None if not used yet."""
        _, length, bid, flags = self.read_desc(self.next_used)
        want = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if self.used_wrap else 0
        return (bid, length) if flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == want else None

    def get_used(self) -> list[tuple[int, int]]:
        """The used descriptors the device wrote since the last call: ``(id, len)``."""
        out = []
        while (used := self._next_used()) is not None:
            bid, length = used
            out.append((bid, length))
            self.next_used += self.ndescs.pop(bid)
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
        return out

    def get_used_in_order(self) -> list[list[int]]:
        """As get_used for a driver that negotiated VIRTIO_F_IN_ORDER
        (§2.8.8): a used descriptor also returns every buffer made available
        before its id; the buffer ids each one returned."""
        out = []
        while (used := self._next_used()) is not None:
            bid = used[0]
            batch = []
            while bid not in batch:
                first = next(iter(self.ndescs))
                batch.append(first)
                self.next_used += self.ndescs.pop(first)
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
            out.append(batch)
        return out

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        self.mem.view(self.driver_event_addr, 4)[:] = struct.pack("<HH", off | wrap << 15, flags)

    def device_event(self) -> tuple[int, int, int]:
        """The device's event suppression area: ``(flags, off, wrap)``."""
        ow, flags = struct.unpack("<HH", self.mem.read(self.device_event_addr, 4))
        return flags, ow & 0x7FFF, ow >> 15


def _mem() -> GuestMemory:
    mem = GuestMemory()
    mem.add(GPA, bytearray(MEM_SIZE), uva=UVA)
    return mem


class Rig:
    """A packed driver ring and the device queue servicing it."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, call_fd: int = -1, mem=None,
                 base: int = GPA, **kw):
        self.mem = mem or _mem()
        self.drv = PackedDriver(self.mem, base, size)
        self.dev = PackedDeviceQueue(self.mem, size, self.drv.desc_addr - GPA + UVA,
                                     self.drv.driver_event_addr - GPA + UVA,
                                     self.drv.device_event_addr - GPA + UVA,
                                     event_idx=event_idx, call_fd=call_fd, **kw)
        self.data = GPA + 0x100000 + (base - GPA) * 4

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.view(gpa, len(data))[:] = data


# --- pop / push -------------------------------------------------------------------

def test_pop_push_round_trip_one_used_descriptor_per_chain():
    rig = Rig()
    rig.write(rig.data, b"hello device")
    bid = rig.drv.add_chain([(rig.data, 12, False), (rig.data + 0x100, 64, True)], bid=5)
    [c] = rig.dev.pop()
    assert (c.head, c.out_len, c.in_len, c.ndescs) == (5, 12, 64, 2)
    assert bytes(c.out[0]) == b"hello device"
    assert rig.dev.write(c, b"reply") == 5
    assert rig.dev.push([(bid, 5)]) == 1
    assert rig.drv.get_used() == [(5, 5)]
    assert rig.mem.read(rig.data + 0x100, 5) == b"reply"
    # §2.8.6: the used descriptor is written at the chain's first slot, next_used skips both.
    assert (rig.dev.last_avail_idx, rig.dev.avail_wrap_counter) == (2, 1)
    assert (rig.dev.next_used, rig.dev.used_wrap_counter) == (2, 1)
    assert rig.dev.pop() == []


def test_wrap_counters_over_many_rounds_with_a_size_not_a_power_of_two():
    rig = Rig(size=5)
    seen_wraps = set()
    for i in range(40):
        n = 1 + i % 3
        bufs = [(rig.data + 0x1000 * k, 8, k == n - 1) for k in range(n)]
        bid = rig.drv.add_chain(bufs)
        [c] = rig.dev.pop()
        assert c.head == bid and c.ndescs == n
        rig.dev.push([(bid, i)])
        assert rig.drv.get_used() == [(bid, i)]
        seen_wraps.add(rig.dev.avail_wrap_counter)
        assert (rig.dev.last_avail_idx, rig.dev.avail_wrap_counter) == (rig.drv.next_avail, rig.drv.avail_wrap)
        assert (rig.dev.next_used, rig.dev.used_wrap_counter) == (rig.drv.next_used, rig.drv.used_wrap)
    assert seen_wraps == {0, 1}


def test_batch_of_used_descriptors_out_of_order_and_vring_base():
    rig = Rig(size=8)
    ids = [rig.drv.add_chain([(rig.data + 0x100 * k, 16, True)]) for k in range(3)]
    chains = rig.dev.pop()
    assert [c.head for c in chains] == ids
    # used in another order: one used descriptor each, written in push order
    assert rig.dev.push([(ids[2], 3), (ids[0], 1), (ids[1], 2)]) == 3
    assert rig.drv.get_used() == [(ids[2], 3), (ids[0], 1), (ids[1], 2)]
    assert rig.dev.vhost_base == encode_vring_base(3, 1, 3, 1) == 3 | 1 << 15 | 3 << 16 | 1 << 31
    with pytest.raises(ArgumentError, match="was not popped"):
        rig.dev.push([(ids[0], 1)])


def test_in_order_writes_one_used_descriptor_per_run_of_zero_length_buffers():
    # §2.8.8: with VIRTIO_F_IN_ORDER the device may write a single used
    # descriptor (the batch's last buffer id) and skip the batch's slots;
    # only buffers it wrote nothing into are folded (their lengths are all 0).
    rig = Rig(size=8, in_order=True)
    ids = [rig.drv.add_chain([(rig.data + 0x100 * k, 16, False), (rig.data + 0x100 * k + 16, 8, False)])
           for k in range(3)]
    rig.dev.pop()
    assert rig.dev.push([(i, 0) for i in ids]) == 3
    used = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
    assert rig.drv.read_desc(0)[1:] == (0, ids[2], used)
    assert all(rig.drv.read_desc(s)[3] & VIRTQ_DESC_F_USED == 0 for s in range(1, 6))
    assert (rig.dev.next_used, rig.dev.used_wrap_counter) == (6, 1)
    # lengths the driver needs stay one descriptor each, a zero-length run between them folds
    more = [rig.drv.add_chain([(rig.data + 0x1000 + 0x100 * k, 16, True)]) for k in range(4)]
    rig.dev.pop()
    rig.dev.push([(more[0], 5), (more[1], 0), (more[2], 0), (more[3], 7)])
    assert [rig.drv.read_desc(s)[1:3] for s in (6, 7, 1)] == [(5, more[0]), (0, more[2]), (7, more[3])]
    assert rig.drv.read_desc(7)[3] == used and rig.drv.read_desc(1)[3] == 0   # wrapped: counter 0
    assert (rig.dev.next_used, rig.dev.used_wrap_counter) == (2, 0)


def test_without_in_order_every_chain_has_its_used_descriptor():
    rig = Rig(size=8)
    ids = [rig.drv.add_chain([(rig.data + 0x100 * k, 16, False)]) for k in range(3)]
    rig.dev.pop()
    rig.dev.push([(i, 0) for i in ids])
    assert rig.drv.get_used() == [(i, 0) for i in ids]


def test_rewind_gives_chains_back():
    rig = Rig()
    a = rig.drv.add_chain([(rig.data, 8, False), (rig.data + 8, 8, True)])
    b = rig.drv.add_chain([(rig.data + 16, 8, True)])
    assert [c.head for c in rig.dev.pop()] == [a, b]
    rig.dev.rewind(1)
    assert rig.dev.last_avail_idx == 2
    rig.dev.rewind(1)
    assert rig.dev.last_avail_idx == 0
    assert [c.head for c in rig.dev.pop()] == [a, b]


def test_vring_base_16_and_32_bit_forms():
    assert decode_vring_base(5 | 1 << 15) == (5, 1, 5, 1)            # DPDK: avail half only
    assert decode_vring_base(encode_vring_base(7, 0, 3, 1)) == (7, 0, 3, 1)
    rig = Rig(size=8, last_avail_idx=6, avail_wrap_counter=0, next_used=4, used_wrap_counter=0)
    assert (rig.dev.last_avail_idx, rig.dev.avail_wrap_counter, rig.dev.next_used,
            rig.dev.used_wrap_counter) == (6, 0, 4, 0)
    with pytest.raises(RingError, match="not below the queue size"):
        Rig(size=8, last_avail_idx=9)


def test_indirect_table():
    rig = Rig()
    table = rig.data + 0x8000
    rig.write(rig.data, b"abc")
    bid = rig.drv.add_indirect(table, [(rig.data, 3, False), (rig.data + 0x100, 10, True),
                                       (rig.data + 0x200, 6, True)])
    [c] = rig.dev.pop()
    assert (c.head, c.ndescs, c.out_len, c.in_len) == (bid, 1, 3, 16)
    rig.dev.push([(bid, 16)])
    assert rig.drv.get_used() == [(bid, 16)]


# --- event suppression ---------------------------------------------------------------

def test_calls_follow_the_driver_event_suppression_flags():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rig = Rig(call_fd=fd, event_capacity=16)
        for flags, want in ((RING_EVENT_FLAGS_DISABLE, False), (RING_EVENT_FLAGS_ENABLE, True),
                            # without EVENT_IDX, DESC is not a mode: treated as enabled (as DPDK)
                            (RING_EVENT_FLAGS_DESC, True)):
            rig.drv.set_driver_event(flags)
            bid = rig.drv.add_chain([(rig.data, 8, True)])
            rig.dev.pop()
            rig.dev.push([(bid, 0)])
            assert rig.dev.notify() is want
        assert rig.dev.counters["calls"] == 2 and rig.dev.counters["calls_suppressed"] == 1
        assert os.eventfd_read(fd) == 2
        assert [k for _, k, _ in rig.dev.drain_events()] == ["call_suppressed", "call", "call"]
    finally:
        os.close(fd)


def test_desc_mode_calls_when_next_used_passes_off_and_wrap():
    rig = Rig(size=4, event_idx=True)

    def use_one():
        bid = rig.drv.add_chain([(rig.data, 8, True)])
        rig.dev.pop()
        rig.dev.push([(bid, 0)])
        rig.drv.get_used()

    use_one()
    assert rig.dev.should_notify()          # the first decision always calls
    # the driver asks for a call once slot 2 (wrap 1) is used
    rig.drv.set_driver_event(RING_EVENT_FLAGS_DESC, 2, 1)
    use_one()                               # slot 1 used
    assert not rig.dev.should_notify()
    use_one()                               # slot 2 used: passed
    assert rig.dev.should_notify()
    # slot 0 of the next lap (wrap 0): not until the ring wrapped
    rig.drv.set_driver_event(RING_EVENT_FLAGS_DESC, 0, 0)
    use_one()                               # slot 3 (wrap 1)
    assert not rig.dev.should_notify()
    use_one()                               # slot 0, wrap 0
    assert rig.dev.should_notify()
    assert rig.dev.used_wrap_counter == 0
    # the same offset with the other wrap counter is a lap away
    rig.drv.set_driver_event(RING_EVENT_FLAGS_DESC, 1, 1)
    use_one()
    assert not rig.dev.should_notify()
    rig.drv.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    use_one()
    assert not rig.dev.should_notify()


def test_kick_suppression_written_in_the_device_event_area():
    rig = Rig(size=8, event_idx=True)
    assert rig.dev.set_notification(False) == 0
    assert rig.drv.device_event()[0] == RING_EVENT_FLAGS_DISABLE
    assert rig.dev.set_notification(True) == 0
    assert rig.drv.device_event() == (RING_EVENT_FLAGS_DESC, 0, 1)
    bid = rig.drv.add_chain([(rig.data, 8, True), (rig.data + 8, 8, True)])
    assert rig.dev.set_notification(True) == 1        # a chain waits: serve it, don't sleep
    rig.dev.pop()
    rig.dev.push([(bid, 0)])
    rig.dev.set_notification(True)
    assert rig.drv.device_event() == (RING_EVENT_FLAGS_DESC, 2, 1)
    plain = Rig(size=8, event_idx=False)
    plain.dev.set_notification(True)
    assert plain.drv.device_event()[0] == RING_EVENT_FLAGS_ENABLE


def test_stall_pops_nothing_and_notice_asks_for_every_kick():
    rig = Rig(event_idx=True)
    rig.dev.set_notification(False)
    rig.drv.add_chain([(rig.data, 8, True)])
    rig.dev.fault = FAULT_STALL
    assert rig.dev.pop() == []
    assert rig.dev.notice() == 1
    assert rig.drv.device_event()[0] == RING_EVENT_FLAGS_ENABLE
    rig.dev.fault = 0
    assert len(rig.dev.pop()) == 1


# --- hostile rings ---------------------------------------------------------------------

def _two_rigs():
    mem = _mem()
    bad = Rig(size=4, mem=mem, base=GPA)
    good = Rig(size=4, mem=mem, base=GPA + 0x4000)
    return bad, good


def _good_still_works(good):
    bid = good.drv.add_chain([(good.data, 8, True)])
    [c] = good.dev.pop()
    good.dev.push([(c.head, 1)])
    assert good.drv.get_used() == [(bid, 1)]


@pytest.mark.parametrize("make, reason", [
    # §2.8.17: a descriptor list is at most Queue Size long (every slot has NEXT)
    (lambda r: r.drv.add_chain([(r.data, 8, False)] * 4, extra_flags=VRING_DESC_F_NEXT),
     "longer than the queue size 4 .*§2.8.17"),
    # §2.8.19: an indirect descriptor is not part of a list linked by NEXT
    (lambda r: r.drv.add_indirect(r.data + 0x800, [(r.data, 8, False)], ring_flags=VRING_DESC_F_NEXT),
     "indirect inside a list .*§2.8.19"),
    # §2.8.19: only WRITE within an indirect table
    (lambda r: r.drv.add_indirect(r.data + 0x800, [(r.data, 8, False)], table_flags=[VRING_DESC_F_INDIRECT]),
     "nested indirect .*§2.8.19"),
    # §2.8.7: an indirect table is a whole number of 16-byte descriptors
    (lambda r: r.drv.add_chain([(r.data, 24, False)], extra_flags=VRING_DESC_F_INDIRECT),
     "length 24, not a non-zero multiple of 16"),
    # §2.8.13: addr is a guest-physical address
    (lambda r: r.drv.add_chain([(GPA + MEM_SIZE + 0x1000, 8, False)]), "outside guest memory"),
    # §2.8.17: device-readable before device-writable
    (lambda r: r.drv.add_chain([(r.data, 8, True), (r.data + 8, 8, False)]),
     "device-readable descriptor 1 after a device-writable one .*§2.8.17"),
])
def test_hostile_ring_breaks_only_its_queue(make, reason):
    bad, good = _two_rigs()
    make(bad)
    with pytest.raises(RingError, match=reason):
        bad.dev.pop()
    assert bad.dev.broken
    with pytest.raises(RingError):
        bad.dev.pop()
    _good_still_works(good)


# --- net fast path on packed rings -------------------------------------------------------

HDR12 = 12
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


def _eth(n: int) -> bytes:
    return MAC_A + MAC_B + b"\x08\x00" + bytes((i * 7) & 0xFF for i in range(n - 14))


class NetRig:
    def __init__(self, size: int = 16, in_order: bool = False):
        self.mem = _mem()
        self.tx = PackedDriver(self.mem, GPA, size)
        self.rx = PackedDriver(self.mem, GPA + 0x10000, size)
        self.txq = PackedDeviceQueue(self.mem, size, self.tx.desc_addr, self.tx.driver_event_addr,
                                     self.tx.device_event_addr, gpa=True, in_order=in_order)
        self.rxq = PackedDeviceQueue(self.mem, size, self.rx.desc_addr, self.rx.driver_event_addr,
                                     self.rx.device_event_addr, gpa=True, in_order=in_order)
        self.s = NetScratch()
        self.next_buf = GPA + 0x100000

    def alloc(self, n: int) -> int:
        a = self.next_buf
        self.next_buf += (n + 0xFFF) & ~0xFFF
        return a

    def send(self, frame: bytes) -> None:
        a = self.alloc(HDR12 + len(frame))
        self.mem.view(a, HDR12 + len(frame))[:] = bytes(HDR12) + frame
        self.tx.add_chain([(a, HDR12, False), (a + HDR12, len(frame), False)])

    def give_rx(self, size: int, count: int = 1) -> list[int]:
        addrs = []
        for _ in range(count):
            a = self.alloc(size)
            self.rx.add_chain([(a, size, True)])
            addrs.append(a)
        return addrs

    def run(self, mrg: bool = True, budget: int = 64) -> int:
        return net_loopback(self.txq, self.rxq, self.s, HDR12, mrg, budget)


def test_loopback_on_packed_rings_swaps_macs_and_wraps():
    rig = NetRig(size=6)
    total = 0
    for rnd in range(10):
        bufs = rig.give_rx(2048, 2)
        rig.send(_eth(64))
        rig.send(_eth(100 + rnd))
        assert rig.run() == 2
        used = rig.rx.get_used()
        assert [n for _, n in used] == [HDR12 + 64, HDR12 + 100 + rnd]
        got = rig.mem.read(bufs[1] + HDR12, 100 + rnd)
        assert got[:12] == MAC_B + MAC_A and got[12:] == _eth(100 + rnd)[12:]
        # num_buffers = 1 (§5.1.6.4)
        assert struct.unpack_from("<H", rig.mem.read(bufs[0], HDR12), 10)[0] == 1
        assert len(rig.tx.get_used()) == 2
        total += 2
    assert rig.rxq.counters["packets"] == rig.txq.counters["packets"] == total


def test_loopback_in_order_one_tx_used_descriptor_per_batch_rx_lengths_kept():
    # size 13 (not a power of two), 5 two-slot frames a round: batches cross the ring's end
    rig = NetRig(size=13, in_order=True)
    total = 0
    for rnd in range(12):
        rig.give_rx(2048, 5)
        for k in range(5):
            rig.send(_eth(60 + k))
        assert rig.run() == 5
        assert [n for _, n in rig.rx.get_used()] == [HDR12 + 60 + k for k in range(5)]
        batches = rig.tx.get_used_in_order()
        assert sum(len(b) for b in batches) == 5 and len(batches) <= 2   # one, two across the wrap
        total += 5
    assert rig.txq.counters["packets"] == rig.rxq.counters["packets"] == total
    assert (rig.txq.next_used, rig.txq.used_wrap_counter) == (rig.tx.next_used, rig.tx.used_wrap)


def test_loopback_batches_more_frames_than_a_burst_and_goes_on_when_rx_breaks():
    rig = NetRig(size=100)
    rig.give_rx(2048, 40)
    for k in range(40):
        rig.send(_eth(60 + k))
    assert rig.run(budget=64) == 40                     # two TX batches (VQD_BURST 32)
    assert [n for _, n in rig.rx.get_used()] == [HDR12 + 60 + k for k in range(40)]
    assert len(rig.tx.get_used()) == 40
    # RX breaks at the 3rd frame of a batch: frames 1-2 land in RX, RX breaks alone and
    # TX goes on with the rest (lost on the receive side)
    a = rig.give_rx(2048, 2)
    rig.rx.add_chain([(0xDEAD0000, 64, True)])
    for k in range(5):
        rig.send(_eth(60))
    assert rig.run() == 5
    assert "outside guest memory" in rig.rxq.broken and rig.txq.broken is None
    assert len(a) == 2 and len(rig.rx.get_used()) == 2 and len(rig.tx.get_used()) == 5
    assert rig.rxq.counters["drops"] == 3
    assert (rig.txq.last_avail_idx, rig.txq.avail_wrap_counter) == (90, 1)   # two slots a frame


def test_loopback_mrg_rxbuf_spans_buffers_and_gives_back_on_starvation():
    rig = NetRig(size=8)
    bufs = rig.give_rx(64, 2)
    rig.send(_eth(100))                     # 112 bytes with the header: two 64-byte buffers
    assert rig.run(mrg=True) == 1
    assert [n for _, n in rig.rx.get_used()] == [64, 48]
    assert struct.unpack_from("<H", rig.mem.read(bufs[0], HDR12), 10)[0] == 2
    # one buffer for a two-buffer frame: dropped on RX, the chain given back untouched
    rig.give_rx(64, 1)
    rig.send(_eth(100))
    assert rig.run(mrg=True) == 1
    assert rig.rx.get_used() == [] and rig.rxq.counters["drops"] == 1
    assert rig.rxq.last_avail_idx == 2      # the chain is still the device's next
    rig.give_rx(64, 1)
    rig.send(_eth(100))
    assert rig.run(mrg=True) == 1
    assert [n for _, n in rig.rx.get_used()] == [64, 48]


def test_loopback_without_mrg_rxbuf_drops_a_frame_too_big():
    rig = NetRig()
    rig.give_rx(64, 1)
    rig.send(_eth(100))
    assert rig.run(mrg=False) == 1
    assert rig.rx.get_used() == [] and rig.rxq.counters["drops"] == 1
    assert len(rig.tx.get_used()) == 1


def test_loopback_refuses_mixed_layouts():
    from inspector.datapath.queue import DeviceQueue
    from inspector.ring.driver import DriverRing
    rig = NetRig()
    split = DriverRing(rig.mem, GPA + 0x20000, 16)
    q = DeviceQueue(rig.mem, 16, split.desc_addr, split.avail_addr, split.used_addr, gpa=True)
    with pytest.raises(ArgumentError):
        net_loopback(rig.txq, q, rig.s, HDR12, True, 8)


def test_slots_made_available_again_before_they_were_used_break_the_queue():
    from inspector._cffi import lib
    rig = Rig(size=2)
    for _ in range(2):
        rig.drv.add_chain([(rig.data, 8, True)])
    chains = rig.dev.pop()
    for c in chains:                    # used, not yet written: the device holds both slots
        assert lib.vqd_pvq_fill(rig.dev.vq, c.head, 0, c.ndescs) == 0
    rig.drv.add_chain([(rig.data, 8, True)])   # slot 0 again, wrap 0: the driver did not wait
    with pytest.raises(RingError, match="available again .* §2.8.16"):
        rig.dev.pop()
