"""The packed-ring decoder, C (inspector.ring.decoder.snapshot_packed) and
pure Python (inspector.ring.reference_packed), on hand-built rings.

Every test runs against both implementations and checks that the other
returns an equal PackedRingSnapshot. Negative tests quote the VIRTIO 1.2
§2.8 rule the ring breaks.
"""

from __future__ import annotations

import json

import pytest

from inspector.errors import ArgumentError, LayoutError, RingError
from inspector.layout import packed_layout
from inspector.ring import decoder, reference_packed
from inspector.ring.packed import packed_counter, packed_distance, packed_position
from inspector.spec.virtio import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from tests.support.packed_ringbuilder import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, PackedRingBuilder,
                                              avail_flags, used_flags)

IMPLS = {"c": decoder, "python": reference_packed}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def snap(rb: PackedRingBuilder, impl, mode="device", **kw) -> dict:
    r = rb.snapshot(impl, mode, **kw)
    other = reference_packed if impl is decoder else decoder
    r2 = rb.snapshot(other, mode, **kw)
    s = r.as_dict()
    assert r2.as_dict() == s
    assert r2 == r
    json.dumps(s)
    return s


def kinds(s: dict) -> list[str]:
    return [a["kind"] for a in s["anomalies"]]


def positions(s: dict) -> tuple:
    return (s["next_used"], s["used_wrap_counter"], s["last_avail_idx"], s["last_avail_wrap_counter"],
            s["next_avail"], s["avail_wrap_counter"])


def truth(rb: PackedRingBuilder) -> tuple:
    return (rb.next_used, rb.used_wrap, rb.last_avail, rb.last_avail_wrap, rb.next_avail, rb.avail_wrap)


# --- positions arithmetic and layout ----------------------------------------------------

def test_counter_and_distance():
    assert packed_counter(0, 1, 8) == 0 and packed_counter(0, 0, 8) == 8
    assert packed_counter(7, 0, 8) == 15
    assert packed_position(16, 8) == (0, 1) and packed_position(-1, 8) == (7, 0)
    assert packed_distance(packed_counter(6, 1, 8), packed_counter(2, 0, 8), 8) == 4
    assert packed_distance(packed_counter(2, 0, 8), packed_counter(2, 1, 8), 8) == 8


def test_packed_layout():
    lay = packed_layout(5)
    assert (lay.desc_size, lay.driver_event_offset, lay.device_event_offset, lay.total_size) == (80, 80, 84, 88)
    for bad in (0, 32769, -1, 2.0, True):
        with pytest.raises(LayoutError):
            packed_layout(bad)
    assert packed_layout(32768).desc_size == 16 * 32768


# --- well-formed rings --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["device", "derived", "flags"])
def test_empty_ring(impl, mode):
    rb = PackedRingBuilder(8)
    s = snap(rb, impl, mode)
    assert positions(s)[4:] == (0, 1) and s["next_used"] == 0 and s["used_wrap_counter"] == 1
    assert s["inflight"] == 0 and s["chains"] == [] and s["anomalies"] == []
    assert s["positions"] == mode
    assert s["ring_flags"] == [0] * 8 and s["ring_id"] == [0] * 8


def test_partial_ring_and_event_areas(impl):
    rb = PackedRingBuilder(8)
    a = rb.add_chain([(100, False), (200, False), (300, True)])
    b = rb.add_chain([(64, True)])
    rb.set_event("driver", 5, 1, 2)
    rb.set_event("device", 0x7FFF, 0, 1)
    s = snap(rb, impl)
    assert s["inflight"] == 4 and (s["next_avail"], s["avail_wrap_counter"]) == (4, 1)
    c0, c1 = s["chains"]
    assert (c0["head"], c0["slot"], len(c0["descs"]), c0["out_bytes"], c0["in_bytes"]) == (a, 0, 3, 300, 300)
    assert (c1["head"], c1["slot"], c1["in_bytes"]) == (b, 3, 64)
    assert [d["flags"] & VRING_DESC_F_NEXT for d in c0["descs"]] == [1, 1, 0]
    assert c0["descs"][0]["flags"] & VIRTQ_DESC_F_AVAIL and not c0["descs"][0]["flags"] & VIRTQ_DESC_F_USED
    assert (s["driver_event_off"], s["driver_event_wrap"], s["driver_event_flags"]) == (5, 1, 2)
    assert (s["device_event_off"], s["device_event_wrap"], s["device_event_flags"]) == (0x7FFF, 0, 1)
    # the Chain view carries the buffer id, the first slot, and ids in Descriptor.next
    ch = rb.snapshot(impl).chain(0)
    assert ch.head == a and ch.slot == 0 and ch.descs[2].next == a


@pytest.mark.parametrize("mode", ["device", "derived"])
def test_taken_chains_are_not_listed(impl, mode):
    rb = PackedRingBuilder(8)
    rb.add_chain([(10, False), (20, True)])
    b = rb.add_chain()
    rb.device_take(2)
    s = snap(rb, impl, mode)
    assert [c["head"] for c in s["chains"]] == [b]
    assert s["inflight"] == 3 and positions(s) == truth(rb)


@pytest.mark.parametrize("mode", ["device", "derived"])
def test_wrap_around_many_rounds(impl, mode):
    rb = PackedRingBuilder(5)
    for round_ in range(7):
        ids = [rb.add_chain([(8, False), (8, True)]), rb.add_chain()]
        rb.device_take(3)
        rb.device_use([(i, 8) for i in ids])
    ids = [rb.add_chain([(8, False), (8, True)]), rb.add_chain([(8, False)])]
    rb.device_take(2)
    s = snap(rb, impl, mode)
    assert positions(s) == truth(rb) and s["anomalies"] == []
    assert [c["head"] for c in s["chains"]] == [ids[1]] and s["inflight"] == 3


def test_chain_across_the_ring_end(impl):
    rb = PackedRingBuilder(4)
    a = rb.add_chain([(8, False)] * 3)
    rb.device_take(3)
    rb.device_use([(a, 0)])
    b = rb.add_chain([(8, False), (9, False), (10, True)])  # slots 3, 0, 1: wraps
    s = snap(rb, impl)
    (c,) = s["chains"]
    assert (c["head"], c["slot"], [d["len"] for d in c["descs"]]) == (b, 3, [8, 9, 10])
    assert (s["next_avail"], s["avail_wrap_counter"]) == (2, 0) and s["anomalies"] == []
    assert c["descs"][0]["flags"] & VIRTQ_DESC_F_AVAIL and not c["descs"][1]["flags"] & VIRTQ_DESC_F_AVAIL


@pytest.mark.parametrize("mode", ["device", "derived"])
def test_out_of_order_completions_with_skipped_slots(impl, mode):
    rb = PackedRingBuilder(8)
    a = rb.add_chain([(8, False), (8, False), (8, True)])  # slots 0-2
    b = rb.add_chain([(8, True)])                           # slot 3
    c = rb.add_chain([(8, False), (8, True)])               # slots 4-5
    rb.device_take(6)
    rb.device_use([(c, 8)])  # used at slot 0, skips 2: next_used 2
    s = snap(rb, impl, mode)
    assert positions(s) == truth(rb) == (2, 1, 6, 1, 6, 1)
    assert s["chains"] == [] and s["inflight"] == 4 and s["anomalies"] == []
    assert s["ring_id"][0] == c and s["ring_flags"][0] & 0x8080 == 0x8080
    d = rb.add_chain([(8, True)])
    s = snap(rb, impl, mode)
    assert [ch["head"] for ch in s["chains"]] == [d]
    del a, b


def test_indirect_chain(impl):
    rb = PackedRingBuilder(8)
    a = rb.add_indirect_chain([(100, False), (200, True), (300, True)])
    s = snap(rb, impl)
    (c,) = s["chains"]
    assert c["head"] == a and c["slot"] == 0 and [d["len"] for d in c["descs"]] == [100, 200, 300]
    assert (c["out_bytes"], c["in_bytes"]) == (100, 500) and s["inflight"] == 1 and s["anomalies"] == []


@pytest.mark.parametrize("mode", ["device", "derived", "flags"])
def test_full_ring_every_descriptor_available(impl, mode):
    """size descriptors outstanding, none taken: the slot before next_used
    is the driver's of the next round (the derivation's exception)."""
    rb = PackedRingBuilder(4)
    x = rb.add_chain()
    rb.device_take(1)
    rb.device_use([(x, 0)])          # positions at slot 1
    ids = [rb.add_chain([(8, False), (8, False)]), rb.add_chain(), rb.add_chain()]
    assert rb.num_free == 0
    s = snap(rb, impl, mode)
    assert s["inflight"] == 4 and [c["head"] for c in s["chains"]] == ids
    if mode != "flags":
        assert positions(s) == truth(rb)
    assert s["anomalies"] == []


def test_full_ring_every_descriptor_taken_is_ambiguous_from_bare_slots(impl):
    """Taken, none used: with bare slots next_used == last_avail, and the
    flags cannot tell "took everything" from "took nothing": the decoder
    says nothing taken (module docstring); with wrap counters it is exact."""
    rb = PackedRingBuilder(4)
    ids = [rb.add_chain() for _ in range(4)]
    rb.device_take(4)
    s = snap(rb, impl, "derived")
    assert (s["next_used"], s["used_wrap_counter"]) == (0, 1) and s["inflight"] == 4
    assert (s["last_avail_idx"], s["last_avail_wrap_counter"]) == (0, 1)
    assert [c["head"] for c in s["chains"]] == ids
    s = snap(rb, impl, "device")
    assert (s["last_avail_idx"], s["last_avail_wrap_counter"]) == (0, 0) and s["chains"] == []


@pytest.mark.parametrize("slot0_round", [0, 1])
def test_derivation_at_slot_0_uses_not_avail_of_the_last_slot(impl, slot0_round):
    rb = PackedRingBuilder(3)
    for _ in range(3 if slot0_round == 0 else 6):  # one or two whole rounds
        i = rb.add_chain()
        rb.device_take(1)
        rb.device_use([(i, 0)])
    assert rb.next_used == 0 and rb.used_wrap == slot0_round
    s = snap(rb, impl, "derived")
    assert positions(s) == truth(rb) and s["positions"] == "derived"


def test_flags_mode_estimates(impl):
    rb = PackedRingBuilder(8)
    a = rb.add_chain()
    b = rb.add_chain()
    c = rb.add_chain()
    rb.device_take(3)
    rb.device_use([(a, 0)])
    s = snap(rb, impl, "flags")
    assert s["positions"] == "flags" and s["last_avail_idx"] is None
    assert (s["next_used"], s["next_avail"], s["inflight"]) == (1, 3, 2)
    assert [ch["head"] for ch in s["chains"]] == [b, c]  # taken chains look available
    # the skipped descriptors after a used one look available too (documented)
    rb.add_chain([(8, False), (8, True)])
    s = snap(rb, impl, "flags")
    assert s["next_avail"] == 5 and s["anomalies"] == []


# --- anomalies ------------------------------------------------------------------------------

def test_id_out_of_range(impl):
    rb = PackedRingBuilder(4)
    rb.add_chain([(8, False), (8, False)])
    rb.set_desc(1, id=9)
    s = snap(rb, impl)
    assert kinds(s) == ["id_out_of_range"] and s["anomalies"][0]["head"] == 0
    assert "buffer id 9" in s["anomalies"][0]["detail"] and s["chains"][0]["head"] == 9


def test_chain_longer_than_the_ring(impl):
    """§2.8.6: a chain is at most size descriptors."""
    rb = PackedRingBuilder(4)
    rb.add_chain([(8, False)] * 4)
    rb.set_desc(3, flags=rb.read_desc(3)[3] | VRING_DESC_F_NEXT)
    s = snap(rb, impl)
    assert kinds(s) == ["chain_too_long"] and len(s["chains"][0]["descs"]) == 4 and s["inflight"] == 4


def test_next_into_a_slot_not_available(impl):
    rb = PackedRingBuilder(8)
    rb.add_chain([(8, False)])
    rb.set_desc(0, flags=rb.read_desc(0)[3] | VRING_DESC_F_NEXT)
    s = snap(rb, impl)
    assert kinds(s) == ["avail_used_pattern"] and s["anomalies"][0]["head"] == 0
    assert s["next_avail"] == 1


def test_avail_bits_not_one_step(impl):
    """§2.8.1: slots the driver wrote before next_avail carry the AVAIL bit of their round."""
    rb = PackedRingBuilder(8)
    for _ in range(4):
        rb.add_chain()
    rb.device_take(4)
    rb.device_use([(i, 0) for i in range(4)])
    rb.set_desc(6, flags=avail_flags(1) | VIRTQ_DESC_F_USED)  # a round-1 AVAIL bit in the previous round
    s = snap(rb, impl)
    assert kinds(s) == ["avail_used_pattern"] and s["anomalies"][0]["head"] is None
    assert "desc[6]" in s["anomalies"][0]["detail"]


def test_chain_being_written_after_next_avail_is_not_an_anomaly(impl):
    """The driver writes a chain's head last (§2.8.21.1): caught between,
    the descriptors after next_avail are new and its head is old."""
    rb = PackedRingBuilder(8)
    rb.add_chain([(8, False), (8, False), (8, True)])
    rb.set_desc(0, flags=used_flags(0))   # the head not yet written
    rb.next_avail = 0
    s = snap(rb, impl)
    assert s["chains"] == [] and s["anomalies"] == [] and s["next_avail"] == 0


def test_indirect_with_next_and_nested(impl):
    rb = PackedRingBuilder(8)
    a = rb.add_indirect_chain([(8, False), (8, True)])
    b = rb.add_indirect_chain([(8, False), (8, True)])
    rb.set_desc(0, flags=rb.read_desc(0)[3] | VRING_DESC_F_NEXT)
    t = rb.tables[b]
    rb.mem.view(t + 16 + 14, 2)[:] = VRING_DESC_F_INDIRECT.to_bytes(2, "little")
    s = snap(rb, impl)
    assert kinds(s) == ["indirect_with_next", "nested_indirect"]
    assert [c["head"] for c in s["chains"]] == [a, b]
    assert len(s["chains"][1]["descs"]) == 1  # stops at the nested entry


@pytest.mark.parametrize("length", [0, 24, 16 * 32768 + 16])
def test_indirect_len(impl, length):
    rb = PackedRingBuilder(8)
    rb.add_indirect_chain()
    rb.set_desc(0, len=length)
    assert kinds(snap(rb, impl)) == ["indirect_len"]


def test_buffer_and_table_outside_memory(impl):
    rb = PackedRingBuilder(8)
    rb.add_chain([(8, False)])
    rb.add_indirect_chain()
    rb.set_desc(0, addr=0xDEAD_0000_0000)
    rb.set_desc(1, addr=0xBEEF_0000_0000)
    assert kinds(snap(rb, impl)) == ["addr_out_of_range", "indirect_out_of_range"]


def test_used_descriptor_in_the_inflight_range(impl):
    """§2.8.9: the device writes used descriptors at next_used only; one
    between next_used and last_avail returns an id the driver never made
    available there."""
    rb = PackedRingBuilder(8)
    for _ in range(3):
        rb.add_chain()
    rb.device_take(3)
    rb.set_desc(1, id=5, flags=used_flags(1))
    s = snap(rb, impl)
    assert kinds(s) == ["used_not_available"] and "desc[1]" in s["anomalies"][0]["detail"]


def test_truncated_still_finds_next_avail(impl):
    rb = PackedRingBuilder(8)
    for _ in range(3):
        rb.add_chain([(8, False), (8, True)])
    s = snap(rb, impl, max_descs=3)
    assert kinds(s) == ["truncated"] and s["next_avail"] == 6 and s["inflight"] == 6
    assert [len(c["descs"]) for c in s["chains"]] == [2, 1, 0]


def test_last_avail_more_than_size_ahead_is_not_used(impl):
    rb = PackedRingBuilder(4)
    rb.add_chain()
    s = snap(rb, impl, next_used=2, used_wrap_counter=1, last_avail_idx=1, last_avail_wrap_counter=1)
    assert s["last_avail_idx"] is None


# --- arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,err", [
    ({"next_used": 8}, RingError), ({"next_used": 0, "used_wrap_counter": 2}, RingError),
    ({"used_wrap_counter": 1}, ArgumentError), ({"last_avail_idx": 1}, ArgumentError),
    ({"next_used": 0, "used_wrap_counter": 1, "last_avail_idx": 1}, ArgumentError),
    ({"next_used": 0, "last_avail_idx": 1, "last_avail_wrap_counter": 1}, ArgumentError),
])
def test_bad_positions(impl, kw, err):
    rb = PackedRingBuilder(8)
    with pytest.raises(err):
        impl.snapshot_packed(rb.mem, 8, *rb.addrs, **kw)


def test_area_outside_memory(impl):
    rb = PackedRingBuilder(8)
    with pytest.raises(RingError, match="device area"):
        impl.snapshot_packed(rb.mem, 8, rb.desc, rb.driver_event, 0xF000_0000)
    with pytest.raises(RingError, match="descriptor ring"):
        impl.snapshot_packed(rb.mem, 8, 0xF000_0000, rb.driver_event, rb.device_event)


def test_odd_sizes(impl):
    for size in (1, 3, 7, 1000):
        rb = PackedRingBuilder(size)
        rb.add_chain()
        s = snap(rb, impl, "derived")
        assert s["inflight"] == 1 and s["size"] == size
