"""The driver side of a packed ring (inspector/ring/driver_packed.py) against
the spec's rules (VIRTIO 1.2 §2.8), checked by a device written here from the
spec alone: it reads chains at its position where AVAIL == its wrap counter
!= USED, writes one used descriptor per chain (AVAIL == USED == its wrap
counter) and skips the chain's descriptors."""

from __future__ import annotations

import random
import struct

import pytest

from inspector.errors import InspectorError, LayoutError
from inspector.memory import GuestMemory
from inspector.ring import decoder, reference_packed
from inspector.ring.anomalies import AnomalyKind
from inspector.ring.driver_packed import HOSTILE_PACKED, PackedDriverRing, avail_flags, event_word, is_used
from inspector.spec.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                                   VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)

RING_GPA = 0x1000
DATA_GPA = 0x100000
DATA_LEN = 0x10000
AU = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
K = AnomalyKind


def ring_of(size: int) -> PackedDriverRing:
    mem = GuestMemory()
    mem.add(RING_GPA, bytearray(16 * max(size, 1) + 64))
    mem.add(DATA_GPA, bytearray(DATA_LEN))
    return PackedDriverRing(mem, RING_GPA, size)


class Device:
    """The device's half, from §2.8 alone: its position for reading
    (``avail``: slot, wrap) and for writing used descriptors (``used``)."""

    def __init__(self, ring: PackedDriverRing):
        self.r = ring
        self.avail = (0, 1)
        self.used = (0, 1)

    def _next(self, slot: int, wrap: int) -> tuple[int, int]:
        slot += 1
        return (0, wrap ^ 1) if slot == self.r.size else (slot, wrap)

    def take(self) -> list[tuple[int, list[tuple[int, int, int, int]]]]:
        """Every available chain from the device's position: ``(buffer id,
        descriptors)``; the id is the last descriptor's (§2.8.6)."""
        chains = []
        for _ in range(self.r.size):
            slot, wrap = self.avail
            flags = self.r.desc_flags(slot)
            if not (bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) != bool(flags & VIRTQ_DESC_F_USED)):
                break
            descs = []
            for _ in range(self.r.size):
                d = self.r.read_desc(slot)
                # every descriptor of the chain is available for its slot's wrap
                assert d[3] & AU == avail_flags(wrap), (slot, wrap, hex(d[3]))
                descs.append(d)
                slot, wrap = self._next(slot, wrap)
                if not d[3] & VRING_DESC_F_NEXT:
                    break
            else:
                raise AssertionError("chain longer than the ring")
            self.avail = (slot, wrap)
            chains.append((descs[-1][2], descs))
        return chains

    def use(self, buffer_id: int, length: int, ndescs: int) -> None:
        slot, wrap = self.used
        a, _, _, _ = self.r.read_desc(slot)
        self.r.write_desc(slot, a, length, buffer_id, AU if wrap else 0)
        for _ in range(ndescs):
            slot, wrap = self._next(slot, wrap)
        self.used = (slot, wrap)

    def set_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        view = self.r.mem.view(self.r.device_event_addr, 4)
        struct.pack_into("<HH", view, 0, event_word(off, wrap), flags)


def buf(i: int, n: int = 64, writable: bool = False) -> tuple[int, int, bool]:
    return DATA_GPA + 128 * i, n, writable


def test_layout_and_initial_state():
    r = ring_of(5)
    assert (r.desc_addr, r.driver_event_addr, r.device_event_addr) == (RING_GPA, RING_GPA + 80, RING_GPA + 84)
    assert (r.next_avail, r.avail_wrap_counter, r.next_used, r.used_wrap_counter) == (0, 1, 0, 1)
    assert r.num_free == 5 and not r.has_used() and r.get_used() == []
    assert r.driver_event == (RING_EVENT_FLAGS_ENABLE, 0, 0)


@pytest.mark.parametrize("size", [0, 32769])
def test_size_outside_the_spec_is_refused(size):
    with pytest.raises(LayoutError, match="size"):
        ring_of(size)


def test_chain_is_invisible_until_published_and_head_flags_go_last():
    r = ring_of(8)
    dev = Device(r)
    bid = r.add_chain([buf(0), buf(1, writable=True), buf(2, writable=True)])
    assert bid == 0
    # Descriptors 1 and 2 are written; the head's flags are still 0: nothing available.
    assert r.desc_flags(0) == 0
    assert r.desc_flags(1) == VIRTQ_DESC_F_AVAIL | VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
    assert r.desc_flags(2) == VIRTQ_DESC_F_AVAIL | VRING_DESC_F_WRITE
    assert dev.take() == []
    assert r.publish() == 3
    assert r.desc_flags(0) == VIRTQ_DESC_F_AVAIL | VRING_DESC_F_NEXT
    [(got, descs)] = dev.take()
    assert got == 0 and [d[:3] for d in descs] == [(DATA_GPA, 64, 0), (DATA_GPA + 128, 64, 0), (DATA_GPA + 256, 64, 0)]
    assert r.num_free == 5 and r.published == 3


def test_id_in_the_last_descriptor_only():
    r = ring_of(8)
    r.add_descs([(DATA_GPA, 8, VRING_DESC_F_NEXT), (DATA_GPA, 8, 0)], buffer_id=5, id_in_all=False)
    assert r.read_desc(0)[2] == 0 and r.read_desc(1)[2] == 5


@pytest.mark.parametrize("size", [1, 3, 5, 8, 256])
def test_many_laps_out_of_order_with_chains_across_the_end(size):
    """Chains of 1..3 descriptors lap a ring of any size many times; the
    device returns them out of order; the driver's next_used and wrap
    counter follow, ids are reused, nothing leaks."""
    rnd = random.Random(size)
    r = ring_of(size)
    dev = Device(r)
    inflight: dict[int, int] = {}
    held: list[tuple[int, int]] = []
    returned = 0
    for step in range(40 * size + 40):
        while True:
            n = rnd.randint(1, min(3, size))
            if n > r.num_free:
                break
            bid = r.add_chain([buf(k, 16 + k, bool(k % 2)) for k in range(n)])
            assert bid not in inflight and 0 <= bid < size
            inflight[bid] = n
            if rnd.random() < 0.3:
                break
        r.publish()
        for bid, descs in dev.take():
            assert len(descs) == inflight[bid]
            held.append((bid, len(descs)))
        rnd.shuffle(held)
        k = rnd.randint(0, len(held))
        for bid, n in held[:k]:
            dev.use(bid, 1000 + bid, n)
        done = held[:k]
        held = held[k:]
        got = r.get_used()
        assert got == [(bid, 1000 + bid) for bid, _ in done]
        for bid, _ in got:
            del inflight[bid]
        returned += len(got)
        assert (r.next_used, r.used_wrap_counter) == dev.used
        assert r.num_free == size - sum(inflight.values())
    assert returned > 20 * size


def test_indirect_chain():
    r = ring_of(4)
    dev = Device(r)
    table = DATA_GPA + 0x8000
    bid = r.add_indirect_chain(table, [buf(0, 12), buf(1, 1500, True), buf(2, 100, True)])
    r.publish()
    [(got, [d])] = dev.take()
    assert got == bid and d[:3] == (table, 48, bid) and d[3] & ~AU == VRING_DESC_F_INDIRECT
    entries = [struct.unpack_from("<QIHH", r.mem.read(table + 16 * i, 16)) for i in range(3)]
    assert entries == [(DATA_GPA, 12, 0, 0), (DATA_GPA + 128, 1500, 0, VRING_DESC_F_WRITE),
                       (DATA_GPA + 256, 100, 0, VRING_DESC_F_WRITE)]
    assert r.num_free == 3
    dev.use(bid, 7, 1)
    assert r.get_used() == [(bid, 7)] and r.num_free == 4


def test_unknown_or_twice_returned_id_is_an_error():
    r = ring_of(4)
    dev = Device(r)
    bid = r.add_chain([buf(0)])
    r.publish()
    dev.take()
    dev.use(3, 0, 1)   # never made available
    with pytest.raises(InspectorError, match="buffer id 3 at slot 0"):
        r.get_used()
    r2 = ring_of(4)
    d2 = Device(r2)
    bid = r2.add_chain([buf(0)])
    r2.add_chain([buf(1)])
    r2.publish()
    d2.take()
    d2.use(bid, 0, 1)
    d2.use(bid, 0, 1)  # the same id twice
    with pytest.raises(InspectorError, match=f"buffer id {bid} at slot 1"):
        r2.get_used()


def test_too_many_descriptors_refused():
    r = ring_of(4)
    r.add_chain([buf(0)] * 3)
    with pytest.raises(InspectorError, match="2 descriptors: 1 free of 4"):
        r.add_chain([buf(0)] * 2)


def test_driver_event_suppression():
    r = ring_of(8)
    dev = Device(r)
    r.disable_calls()
    assert r.driver_event[0] == RING_EVENT_FLAGS_DISABLE
    r.enable_calls(event_idx=False)
    assert r.driver_event[0] == RING_EVENT_FLAGS_ENABLE
    for _ in range(3):   # move next_used across the end: 3 x 3 descriptors on 8 slots
        bid = r.add_chain([buf(0)] * 3)
        r.publish()
        dev.take()
        dev.use(bid, 0, 3)
        r.get_used()
    assert (r.next_used, r.used_wrap_counter) == (1, 0)
    r.enable_calls(event_idx=True)
    assert r.driver_event == (RING_EVENT_FLAGS_DESC, 1, 0)
    raw = r.mem.read(r.driver_event_addr, 4)
    assert struct.unpack("<HH", raw) == (1, RING_EVENT_FLAGS_DESC)


def test_need_kick_follows_the_device_event_suppression():
    r = ring_of(8)
    dev = Device(r)
    since = r.published
    r.add_chain([buf(0)] * 2)
    r.publish()                       # slots 0, 1 (wrap 1) published
    dev.set_event(RING_EVENT_FLAGS_ENABLE)
    assert r.need_kick(since, event_idx=True)
    dev.set_event(RING_EVENT_FLAGS_DISABLE)
    assert not r.need_kick(since, event_idx=True)
    dev.set_event(RING_EVENT_FLAGS_DESC, 1, 1)
    assert r.need_kick(since, event_idx=True)
    dev.set_event(RING_EVENT_FLAGS_DESC, 2, 1)       # the next one: not yet
    assert not r.need_kick(since, event_idx=True)
    assert r.need_kick(since, event_idx=False)        # DESC is not honoured without EVENT_IDX
    dev.set_event(RING_EVENT_FLAGS_DESC, 0, 0)       # slot 0 of the next lap: not yet
    assert not r.need_kick(since, event_idx=True)
    # Not-yet-published chains are not in the window.
    r.add_chain([buf(0)])
    assert not r.need_kick(r.published, event_idx=True)
    dev.set_event(RING_EVENT_FLAGS_DESC, 2, 1)
    assert not r.need_kick(since, event_idx=True)


def test_need_kick_window_across_the_wrap():
    r = ring_of(5)
    dev = Device(r)
    bid = r.add_chain([buf(0)] * 4)
    r.publish()
    dev.take()
    dev.use(bid, 0, 4)
    r.get_used()
    since = r.published
    r.add_chain([buf(0)] * 3)        # slots 4 (wrap 1), 0, 1 (wrap 0)
    r.publish()
    for off, wrap, want in ((4, 1, True), (0, 0, True), (1, 0, True), (2, 0, False),
                            (3, 1, False), (0, 1, False)):
        dev.set_event(RING_EVENT_FLAGS_DESC, off, wrap)
        assert r.need_kick(since, event_idx=True) is want, (off, wrap)
    dev.set_event(RING_EVENT_FLAGS_DESC, 7, 0)       # off >= size: kick, never hang
    assert r.need_kick(since, event_idx=True)


def test_device_used_position():
    r = ring_of(4)
    dev = Device(r)
    a = r.add_chain([buf(0)] * 2)
    b = r.add_chain([buf(1)] * 2)
    r.publish()
    dev.take()
    assert r.device_used_position() == (0, 1)
    dev.use(b, 0, 2)
    dev.use(a, 0, 2)
    assert r.device_used_position() == (0, 0)       # two used descriptors of two slots each
    assert (r.next_used, r.used_wrap_counter) == (0, 1)  # nothing collected
    assert len(r.get_used()) == 2 and (r.next_used, r.used_wrap_counter) == (0, 0)


def test_helpers():
    assert avail_flags(1) == VIRTQ_DESC_F_AVAIL and avail_flags(0) == VIRTQ_DESC_F_USED
    assert is_used(AU, 1) and is_used(0, 0) and not is_used(AU, 0) and not is_used(VIRTQ_DESC_F_AVAIL, 1)
    assert event_word(5, 1) == 0x8005 and event_word(0x7FFF, 0) == 0x7FFF


# --- hostile rings -------------------------------------------------------------------------------
def hostile(kind: AnomalyKind, size: int = 8, **kw) -> tuple[PackedDriverRing, int]:
    r = ring_of(size)
    bid = r.add_hostile(kind, (DATA_GPA, 64, False), table_addr=DATA_GPA + 0x8000,
                        mem_end=DATA_GPA + DATA_LEN, **kw)
    r.publish()
    return r, bid


def test_hostile_kinds_are_documented_with_their_rule():
    assert all("§" in rule or "flagged" in rule for rule in HOSTILE_PACKED.values())
    with pytest.raises(InspectorError, match="no hostile packed ring shows as"):
        hostile(K.LOOP)


def test_hostile_id_out_of_range():
    r, bid = hostile(K.ID_OUT_OF_RANGE)
    assert bid == 8 and r.read_desc(0)[2] == 8


def test_hostile_chain_too_long():
    r, _ = hostile(K.CHAIN_TOO_LONG, size=6)
    assert all(r.desc_flags(s) & VRING_DESC_F_NEXT for s in range(6)) and r.num_free == 0
    r2 = ring_of(6)
    r2.add_chain([buf(0)])
    with pytest.raises(InspectorError, match="idle ring"):
        r2.add_hostile(K.CHAIN_TOO_LONG, (DATA_GPA, 64, False), table_addr=DATA_GPA, mem_end=DATA_GPA)


def test_hostile_avail_used_pattern():
    r, _ = hostile(K.AVAIL_USED_PATTERN)
    assert r.desc_flags(0) & AU == VIRTQ_DESC_F_AVAIL          # head: available for wrap 1
    assert r.desc_flags(1) & AU == VIRTQ_DESC_F_USED           # next: the other lap's bits


def test_hostile_indirect_kinds():
    table = DATA_GPA + 0x8000
    r, _ = hostile(K.INDIRECT_WITH_NEXT)
    assert r.desc_flags(0) & (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) == VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT
    r, _ = hostile(K.NESTED_INDIRECT)
    assert struct.unpack_from("<QIHH", r.mem.read(table + 16, 16))[3] == VRING_DESC_F_INDIRECT
    r, _ = hostile(K.INDIRECT_LEN)
    assert r.read_desc(0)[1] == 24
    r, _ = hostile(K.INDIRECT_OUT_OF_RANGE)
    assert r.read_desc(0)[0] >= DATA_GPA + DATA_LEN


def test_hostile_buffers():
    r, _ = hostile(K.ADDR_OUT_OF_RANGE)
    assert r.read_desc(0)[0] >= DATA_GPA + DATA_LEN
    r, _ = hostile(K.ZERO_LEN)
    assert r.read_desc(1)[1] == 0


# --- what the packed decoders read in the rings written here -------------------------------------
DECODERS = [pytest.param(reference_packed.snapshot_packed, id="python"),
            pytest.param(decoder.snapshot_packed, id="c")]


def decode(r: PackedDriverRing, dev: Device, snapshot_packed):
    return snapshot_packed(r.mem, r.size, r.desc_addr, r.driver_event_addr, r.device_event_addr,
                           next_used=dev.used[0], used_wrap_counter=dev.used[1],
                           last_avail_idx=dev.avail[0], last_avail_wrap_counter=dev.avail[1])


@pytest.mark.parametrize("snapshot_packed", DECODERS)
def test_decoders_read_the_rings_written_here(snapshot_packed):
    """Several laps of a 7-slot ring, out of order: the chains the decoders
    list from the device's positions are those published and not yet taken,
    with the buffer ids, slots and lengths written; positions, in-flight
    count and the driver event suppression agree; no anomaly."""
    rnd = random.Random(7)
    r = ring_of(7)
    dev = Device(r)
    held: list[tuple[int, int]] = []
    for step in range(60):
        waiting = []
        while r.num_free:
            n = rnd.randint(1, min(3, r.num_free))
            slot = r.next_avail
            bid = r.add_chain([buf(k, 20 + k, k == n - 1) for k in range(n)])
            waiting.append((bid, slot, n))
            if rnd.random() < 0.4:
                break
        r.publish()
        r.enable_calls(event_idx=True)
        snap = decode(r, dev, snapshot_packed)
        assert not snap.anomalies, snap.anomalies
        assert [(c.head, c.slot, len(c.descs)) for c in snap.chains] == waiting
        assert (snap.next_avail, snap.avail_wrap_counter) == (r.next_avail, r.avail_wrap_counter)
        assert snap.inflight == r.size - r.num_free
        assert (snap.driver_event_flags, snap.driver_event_off, snap.driver_event_wrap) == r.driver_event
        held += [(bid, len(descs)) for bid, descs in dev.take()]
        rnd.shuffle(held)
        k = rnd.randint(0, len(held))
        for bid, n in held[:k]:
            dev.use(bid, 0, n)
        held = held[k:]
        r.get_used()


@pytest.mark.parametrize("snapshot_packed", DECODERS)
@pytest.mark.parametrize("kind", sorted(HOSTILE_PACKED), ids=str)
def test_decoders_name_each_hostile_kind(kind, snapshot_packed):
    r, _ = hostile(kind)
    snap = decode(r, Device(r), snapshot_packed)
    assert kind in {a.kind for a in snap.anomalies}, snap.anomalies
