"""The split-ring decoder, C (inspector.ring.decoder) and pure Python (inspector.ring.reference).

Every test runs against both implementations (``impl`` fixture) and checks
that the other one returns an equal RingSnapshot (columns and ``as_dict()``).
Most tests read ``as_dict()``, the decoder's plain-data view (chains as in the
Snapshot JSON; anomalies with their ``head``). Negative tests quote the
VIRTIO 1.2 rule the ring breaks.
"""

from __future__ import annotations

import json

import pytest

from inspector.ring import decoder, reference
from inspector.ring.checks import AREAS
from inspector.errors import LayoutError, RingError
from inspector.memory import GuestMemory
from inspector.ring.anomalies import DECODER_KINDS, Anomaly, AnomalyKind
from inspector.ring.snapshot import COLUMNS, RingSnapshot
from tests.support.ringbuilder import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                               RingBuilder)

IMPLS = {"c": decoder, "python": reference}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def snap(rb: RingBuilder, impl, last_avail_idx=None, **kw) -> dict:
    """Snapshot with ``impl``; assert the other implementation agrees; the
    snapshot's ``as_dict()``."""
    r = rb.snapshot(impl, last_avail_idx, **kw)
    assert isinstance(r, RingSnapshot)
    other = reference if impl is decoder else decoder
    r2 = rb.snapshot(other, last_avail_idx, **kw)
    s = r.as_dict()
    assert r2.as_dict() == s
    assert r2 == r  # column equality
    json.dumps(s)  # plain JSON types only
    return s


def chain_dict(chain) -> dict:
    """A :class:`~inspector.ring.snapshot.Chain` as a dict of ``chain_dicts()``."""
    return {"head": chain.head, "descs": [d._asdict() for d in chain.descs],
            "out_bytes": chain.out_bytes, "in_bytes": chain.in_bytes}


def kinds(s: dict) -> list[str]:
    return [a["kind"] for a in s["anomalies"]]


# --- well-formed rings ----------------------------------------------------------

def test_empty_ring(impl):
    rb = RingBuilder(8)
    s = snap(rb, impl)
    assert s["avail_idx"] == s["used_idx"] == s["inflight"] == 0
    assert s["chains"] == [] and s["anomalies"] == []
    assert s["avail_ring"] == [0] * 8 and s["used_ring"] == [[0, 0]] * 8
    assert s["last_avail_idx"] is None
    assert set(s) == {"avail_flags", "avail_idx", "avail_ring", "used_event", "used_flags",
                      "used_idx", "used_ring", "avail_event", "last_avail_idx", "inflight",
                      "chains", "anomalies"}


def test_direct_chain_bytes_and_descs(impl):
    rb = RingBuilder(8)
    head = rb.add_chain([(100, False), (200, False), (300, True)])
    rb.publish()
    s = snap(rb, impl)
    assert s["avail_idx"] == 1 and s["inflight"] == 1
    (chain,) = s["chains"]
    assert chain["head"] == head
    assert chain["out_bytes"] == 300 and chain["in_bytes"] == 300
    ids = rb.chain_ids(head)
    assert [d["len"] for d in chain["descs"]] == [100, 200, 300]
    assert [d["flags"] for d in chain["descs"]] == [VRING_DESC_F_NEXT, VRING_DESC_F_NEXT,
                                                   VRING_DESC_F_WRITE]
    assert [d["next"] for d in chain["descs"][:2]] == ids[1:]
    assert chain["descs"][0]["addr"] == rb.desc(ids[0])[0]
    assert s["anomalies"] == []


def test_indirect_chain_lists_table_descriptors(impl):
    """§2.7.5.3: the chain of an indirect descriptor is its table's; the
    indirect descriptor itself is not listed."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(16, False), (32, False), (64, True), (128, True)])
    rb.publish()
    s = snap(rb, impl)
    (chain,) = s["chains"]
    assert chain["head"] == head
    assert [d["len"] for d in chain["descs"]] == [16, 32, 64, 128]
    assert [d["next"] for d in chain["descs"][:3]] == [1, 2, 3]
    assert chain["out_bytes"] == 48 and chain["in_bytes"] == 192
    assert s["anomalies"] == []


def test_direct_descriptors_then_indirect(impl):
    """§2.7.5.3.2: "The device MUST handle the case of zero or more normal
    chained descriptors followed by a single descriptor with
    flags&VIRTQ_DESC_F_INDIRECT." """
    rb = RingBuilder(8)
    head = rb.add_chain([(10, False), (20, True)])
    table = rb.alloc(32)
    rb.mem.view(table, 32)[:] = (reference._DESC.pack(rb.alloc(40), 40, VRING_DESC_F_NEXT, 1)
                                 + reference._DESC.pack(rb.alloc(50), 50, VRING_DESC_F_WRITE, 0))
    last = rb.chain_ids(head)[1]
    # the indirect descriptor's WRITE flag is ignored (§2.7.5.3.2)
    rb.set_desc(last, addr=table, len=32, flags=VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)
    rb.corrupt_next(rb.chain_ids(head)[0], last)
    rb.publish()
    s = snap(rb, impl)
    (chain,) = s["chains"]
    assert [d["len"] for d in chain["descs"]] == [10, 40, 50]
    assert chain["out_bytes"] == 50 and chain["in_bytes"] == 50
    assert s["anomalies"] == []


def test_header_fields_and_rings(impl):
    rb = RingBuilder(4)
    rb.ring.avail_flags = 1
    rb.ring.used_event = 0xBEEF
    rb.set_used_flags(1)
    rb.set_avail_event(0x1234)
    heads = [rb.add_chain() for _ in range(3)]
    rb.publish()
    rb.device_use([(heads[0], 77)])
    s = snap(rb, impl)
    assert (s["avail_flags"], s["used_flags"]) == (1, 1)
    assert (s["used_event"], s["avail_event"]) == (0xBEEF, 0x1234)
    assert s["avail_ring"][:3] == heads
    assert s["used_ring"][0] == [heads[0], 77]
    assert s["used_idx"] == 1 and s["inflight"] == 2
    # last_avail_idx unknown: chains start at used->idx
    assert [c["head"] for c in s["chains"]] == heads[1:]


def test_last_avail_idx_given(impl):
    rb = RingBuilder(8)
    heads = [rb.add_chain() for _ in range(5)]
    rb.publish()
    s = snap(rb, impl, last_avail_idx=3)
    assert s["last_avail_idx"] == 3 and s["inflight"] == 5
    assert [c["head"] for c in s["chains"]] == heads[3:]
    assert snap(rb, impl, last_avail_idx=5)["chains"] == []


def test_index_wraps_at_65536(impl):
    """§2.7.6: idx "starts at 0, and increases"; it wraps naturally."""
    rb = RingBuilder(8)
    rb.start_at(65534)
    heads = [rb.add_chain() for _ in range(4)]
    rb.publish()
    s = snap(rb, impl)
    assert s["avail_idx"] == 2 and s["used_idx"] == 65534 and s["inflight"] == 4
    assert [c["head"] for c in s["chains"]] == heads
    assert s["avail_ring"][65534 % 8] == heads[0]
    assert s["anomalies"] == []


def test_full_ring_chain_of_queue_size_is_not_a_loop(impl):
    rb = RingBuilder(4)
    rb.add_chain([(8, False)] * 4)
    rb.publish()
    s = snap(rb, impl)
    assert len(s["chains"][0]["descs"]) == 4 and s["anomalies"] == []


def test_same_head_in_several_slots_is_walked_for_each(impl):
    rb = RingBuilder(8)
    head = rb.add_chain([(8, False), (8, True)])
    rb.set_head(1, head)
    rb.set_head(2, head)
    rb.jump_avail_idx(2)
    s = snap(rb, impl)
    assert [c["head"] for c in s["chains"]] == [head] * 3
    assert s["chains"][0] == s["chains"][1] == s["chains"][2]


def test_regions_read_only_and_offset(impl):
    """A region backed by bytes (read only) at a buf_offset."""
    rb = RingBuilder(8)
    rb.add_chain([(8, False)])
    rb.publish()
    pad = bytes(100)
    mem = GuestMemory()
    mem.add(0x10000, pad + bytes(rb.ring_buf), buf_offset=100)
    mem.add(rb.data_gpa, bytes(rb.data_buf))
    s = impl.snapshot_split(mem, 8, *rb.addrs, None)
    assert s.as_dict() == snap(rb, impl)


# --- the RingSnapshot type -------------------------------------------------------

def _mixed_ring() -> RingBuilder:
    """Direct and indirect chains, one out-of-range head, a used element."""
    rb = RingBuilder(16)
    heads = [rb.add_chain([(100, False), (200, True)]),
             rb.add_indirect_chain([(16, False), (32, True), (64, True)]),
             rb.add_chain([(8, False)]),
             rb.add_chain([(1, False), (2, False), (3, True)])]
    rb.publish()
    rb.device_use([(heads[0], 300)])
    rb.set_head(2, 999)
    return rb


def test_chains_view_of_c_equals_reference():
    rb = _mixed_ring()
    c, p = rb.snapshot(decoder), rb.snapshot(reference)
    assert c.chains == p.chains
    assert [chain_dict(ch) for ch in c.chains] == c.as_dict()["chains"] == c.chain_dicts()
    assert c.chains is c.chains  # cached
    assert [c.chain(k) for k in range(c.n_chains)] == p.chains
    assert c.chain(-1) == p.chains[-1]
    assert c.anomalies == p.anomalies == [Anomaly(AnomalyKind.HEAD_OUT_OF_RANGE,
                                                  "avail->ring[2] = head 999 >= size 16", None)]


def test_ring_snapshot_columns(impl):
    rb = _mixed_ring()
    r = rb.snapshot(impl)
    d = r.as_dict()
    assert (r.size, r.avail_idx, r.used_idx, r.inflight) == (16, 4, 1, 3)
    assert r.last_avail_idx is None and r.used_event == d["used_event"]
    assert r.n_chains == 3 and r.n_descs == 3 + 0 + 3
    for name, fmt in COLUMNS.items():
        col = getattr(r, name)
        assert (col.format if isinstance(col, memoryview) else col.typecode) == fmt, name
    assert list(r.chain_ndescs) == [len(c["descs"]) for c in d["chains"]]
    assert [len(c.descs) for c in r.chains] == list(r.chain_ndescs)
    assert list(r.chain_first) == [0, 3, 3]
    assert r.used_elem(0) == (d["used_ring"][0][0], 300)
    assert r.avail_ring.tolist() == d["avail_ring"]
    assert [{"kind": a.kind, "detail": a.detail, "head": a.head} for a in r.anomalies] == d["anomalies"]
    # chain(k) built alone equals the cached view; as_dict shares nothing
    assert r.chain(1) == r.chains[1]
    d["chains"][0]["descs"].clear()
    d["anomalies"].append({"kind": "x", "detail": "y"})
    assert r.as_dict()["chains"] == [chain_dict(c) for c in r.chains] and len(r.anomalies) == 1
    with pytest.raises(IndexError):
        r.chain(3)


def test_c_snapshot_survives_the_next_walk():
    """C columns are copies: the per-thread output arrays are reused by the
    next snapshot."""
    rb = _mixed_ring()
    first = rb.snapshot(decoder)
    before = first.as_dict()
    other = RingBuilder(16)
    for _ in range(5):
        other.add_chain([(7, True)] * 3)
    other.publish()
    rb2 = other.snapshot(decoder)
    assert rb2.n_descs == 15
    assert first.as_dict() == before


# --- argument and area errors ----------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 100, 65536, -8])
def test_bad_size(impl, size):
    """§2.7: "Queue Size value is always a power of 2. The maximum Queue Size
    value is 32768." """
    rb = RingBuilder(8)
    with pytest.raises(LayoutError):
        impl.snapshot_split(rb.mem, size, *rb.addrs, None)


@pytest.mark.parametrize("area", [0, 1, 2])
@pytest.mark.parametrize("where", ["unmapped", "straddles", "negative", "huge"])
def test_area_outside_memory(impl, area, where):
    rb = RingBuilder(8)
    addrs = list(rb.addrs)
    region_end = 0x10000 + len(rb.ring_buf)
    addrs[area] = {"unmapped": 0x5000_0000, "straddles": region_end - 8, "negative": -16,
                   "huge": 1 << 64}[where]
    with pytest.raises(RingError) as e:
        impl.snapshot_split(rb.mem, 8, *addrs, None)
    assert AREAS[area] in str(e.value)
    assert f"0x{addrs[area]:x}" in str(e.value)
    other = reference if impl is decoder else decoder
    with pytest.raises(RingError) as e2:
        other.snapshot_split(rb.mem, 8, *addrs, None)
    assert str(e2.value) == str(e.value)


def test_area_ends_exactly_at_region_end(impl):
    size = 8
    mem = GuestMemory()
    mem.add(0x1000, bytearray(16 * size))
    mem.add(0x2000, bytearray(6 + 2 * size))
    mem.add(0x3000, bytearray(6 + 8 * size))
    s = impl.snapshot_split(mem, size, 0x1000, 0x2000, 0x3000, None)
    assert s.chains == [] and s.as_dict()["chains"] == []
    with pytest.raises(RingError, match="device area"):
        impl.snapshot_split(mem, size, 0x1000, 0x2000, 0x3001, None)


def test_region_shorter_buffer_than_declared(impl):
    """A region table entry whose buffer is shorter than its size must not let
    the decoder read past the buffer."""
    rb = RingBuilder(8)
    mem = GuestMemory()
    mem.add(0x10000, bytearray(64), size=1 << 20)
    with pytest.raises(RingError):
        impl.snapshot_split(mem, 8, *rb.addrs, None)


@pytest.mark.parametrize("last", [-1, 65536])
def test_bad_last_avail_idx(impl, last):
    rb = RingBuilder(8)
    with pytest.raises(RingError, match="last_avail_idx"):
        impl.snapshot_split(rb.mem, 8, *rb.addrs, last)


# --- hostile rings: one anomaly kind each ---------------------------------------------

def test_avail_idx_jump(impl):
    """§2.7.6 / §2.7.13.3: avail->idx counts the heads the driver made
    available; with Queue Size descriptors it cannot be more than size ahead
    of the device."""
    rb = RingBuilder(8)
    rb.add_chain()
    rb.publish()
    rb.jump_avail_idx(1000)
    s = snap(rb, impl)
    assert kinds(s)[0] == "avail_idx_jump"
    assert s["anomalies"][0]["detail"] == ("avail->idx 1001 is 1001 ahead of used->idx 0, "
                                           "more than size 8: walked 8 heads")
    assert len(s["chains"]) == 8
    s = snap(rb, impl, last_avail_idx=0)
    assert "ahead of last_avail_idx 0" in s["anomalies"][0]["detail"]


def test_head_out_of_range(impl):
    """§2.7.6: avail->ring[] holds heads of descriptor chains: indices into a
    table of Queue Size descriptors."""
    rb = RingBuilder(8)
    rb.add_chain()
    rb.add_chain()
    rb.publish()
    rb.set_head(0, 300)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "head_out_of_range",
                               "detail": "avail->ring[0] = head 300 >= size 8", "head": None}]
    assert s["chains"][0] == {"head": 300, "descs": [], "out_bytes": 0, "in_bytes": 0}
    assert len(s["chains"][1]["descs"]) == 1


def test_next_out_of_range(impl):
    """§2.7.5: next indexes the descriptor table (Queue Size entries)."""
    rb = RingBuilder(8)
    head = rb.add_chain([(10, False), (20, True)])
    rb.publish()
    first = rb.chain_ids(head)[0]
    rb.corrupt_next(first, 9)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "next_out_of_range",
                               "detail": f"desc[{first}].next = 9 >= size 8 (head {head})",
                               "head": head}]
    assert len(s["chains"][0]["descs"]) == 1  # the descriptors read so far
    assert s["chains"][0]["out_bytes"] == 10


def test_indirect_next_out_of_range(impl):
    """§2.7.5.3: next inside an indirect table indexes that table."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    rb.set_table_entry(head, 0, next=2)
    s = snap(rb, impl)
    assert kinds(s) == ["next_out_of_range"]
    assert s["anomalies"][0]["detail"] == (f"desc[{head}]->indirect[0].next = 2 >= table "
                                           f"entries 2 (head {head})")
    assert len(s["chains"][0]["descs"]) == 1


@pytest.mark.parametrize("to_head", [True, False])
def test_loop(impl, to_head):
    """§2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
    bytes in total; this implies that loops in the descriptor chain are
    forbidden!" """
    rb = RingBuilder(8)
    head = rb.add_chain([(10, False), (20, False), (30, False)])
    rb.publish()
    ids = rb.chain_ids(head)
    rb.make_loop(head, to=None if to_head else ids[1])
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "loop", "detail": f"chain from head {head} is longer "
                                                         f"than the descriptor table (size 8): loop",
                               "head": head}]
    assert len(s["chains"][0]["descs"]) == 8  # bounded by the queue size


def test_self_loop_on_every_slot_is_bounded(impl):
    rb = RingBuilder(256)
    head = rb.add_chain([(10, False)])
    rb.corrupt_next(head, head)
    for slot in range(256):
        rb.set_head(slot, head)
    rb.jump_avail_idx(255)
    s = snap(rb, impl)
    assert len(s["chains"]) == 256
    assert kinds(s) == ["loop"] * 256
    assert {a["head"] for a in s["anomalies"]} == {head}
    assert all(len(c["descs"]) == 256 for c in s["chains"])


def test_indirect_loop(impl):
    """§2.7.5.2: loops are forbidden, inside an indirect table too."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, False)])
    rb.publish()
    rb.set_table_entry(head, 1, flags=VRING_DESC_F_NEXT, next=0)
    s = snap(rb, impl)
    assert kinds(s) == ["loop"]
    assert s["anomalies"][0]["detail"] == (f"desc[{head}]->indirect chain is longer than its "
                                           f"table of 2 entries: loop (head {head})")
    assert s["anomalies"][0]["head"] == head
    assert len(s["chains"][0]["descs"]) == 2


@pytest.mark.parametrize("length", [0, 15, 24, 16 * 32768 + 16])
def test_indirect_len(impl, length):
    """§2.7.5.3: the table is ``struct virtq_desc desc[len / 16]``, so len is
    a non-zero multiple of 16; §2.7.5.3.1: "A driver MUST NOT create a
    descriptor chain longer than the Queue Size of the device" (≤ 32768)."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain()
    rb.publish()
    rb.set_desc(head, len=length)
    s = snap(rb, impl)
    assert kinds(s) == ["indirect_len"]
    assert f"desc[{head}].len = {length} for an indirect table" in s["anomalies"][0]["detail"]
    assert s["anomalies"][0]["head"] == head
    assert s["chains"][0]["descs"] == []


def test_nested_indirect(impl):
    """§2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
    within an indirect descriptor (ie. only one table per descriptor)." """
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, False), (30, True)])
    rb.publish()
    rb.nest_indirect(head, 1)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "nested_indirect",
                               "detail": f"desc[{head}]->indirect[1].flags = 0x5 sets "
                                         f"VRING_DESC_F_INDIRECT (head {head})", "head": head}]
    assert [d["len"] for d in s["chains"][0]["descs"]] == [10]


def test_indirect_with_next(impl):
    """§2.7.5.3.1: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and
    VIRTQ_DESC_F_NEXT in flags." The table is still listed; next is not
    followed (§2.7.5.3.2: the indirect descriptor ends the chain)."""
    rb = RingBuilder(8)
    other = rb.add_chain([(99, False)])
    head = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    rb.set_desc(head, flags=VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, next=other)
    s = snap(rb, impl, last_avail_idx=1)
    assert s["anomalies"] == [{"kind": "indirect_with_next",
                               "detail": f"desc[{head}].flags = 0x5 sets both "
                                         f"VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT "
                                         f"(head {head})", "head": head}]
    assert [d["len"] for d in s["chains"][0]["descs"]] == [10, 20]


def test_zero_len(impl):
    """§2.7.5: a descriptor describes a buffer of len bytes; zero carries no
    buffer (not forbidden to the driver; reported, the walk goes on)."""
    rb = RingBuilder(8)
    head = rb.add_chain([(10, False), (20, True)])
    rb.publish()
    second = rb.chain_ids(head)[1]
    rb.zero_len(second)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "zero_len",
                               "detail": f"desc[{second}].len = 0 (head {head})", "head": head}]
    assert len(s["chains"][0]["descs"]) == 2 and s["chains"][0]["in_bytes"] == 0


def test_zero_len_in_indirect_table(impl):
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    rb.set_table_entry(head, 1, len=0)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "zero_len",
                               "detail": f"desc[{head}]->indirect[1].len = 0 (head {head})",
                               "head": head}]


@pytest.mark.parametrize("addr,length", [
    (0xDEAD_0000_0000, 64),            # outside every region
    (0x100000 + 0x40000 - 8, 64),      # straddles the end of the data region
    (0xFFFF_FFFF_FFFF_FFF0, 0x20),     # addr + len overflows 64 bits
    (0x100000, 0xFFFF_FFFF),           # starts inside, far too long
])
def test_addr_out_of_range(impl, addr, length):
    """§2.7.5: addr is a guest-physical address; the buffer must be guest
    memory (here: inside one region of the memory table)."""
    rb = RingBuilder(8)
    head = rb.add_chain([(10, False), (20, True)])
    rb.publish()
    first = rb.chain_ids(head)[0]
    rb.set_desc(first, addr=addr, len=length)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "addr_out_of_range",
                               "detail": f"desc[{first}].addr 0x{addr:x} len {length} is not "
                                         f"inside one memory region (head {head})", "head": head}]
    assert len(s["chains"][0]["descs"]) == 2  # not fatal: the walk goes on


@pytest.mark.parametrize("addr", [0xDEAD_0000_0000, 0x100000 + 0x40000 - 16,
                                  0xFFFF_FFFF_FFFF_FFF0])
def test_indirect_out_of_range(impl, addr):
    """§2.7.5.3: addr of an indirect descriptor is the guest-physical address
    of its table."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    rb.set_desc(head, addr=addr)
    s = snap(rb, impl)
    assert s["anomalies"] == [{"kind": "indirect_out_of_range",
                               "detail": f"desc[{head}] indirect table 0x{addr:x} len 32 is not "
                                         f"inside one memory region (head {head})", "head": head}]
    assert s["chains"][0]["descs"] == []


def test_truncated_by_max_descs(impl):
    rb = RingBuilder(8)
    heads = [rb.add_chain([(8, False), (8, True)]) for _ in range(3)]
    rb.publish()
    s = snap(rb, impl, max_descs=3)
    assert [len(c["descs"]) for c in s["chains"]] == [2, 1, 0]
    assert s["anomalies"] == [{"kind": "truncated",
                               "detail": f"snapshot lists at most 3 descriptors: chain of "
                                         f"avail->ring[1] (head {heads[1]}) and later chains "
                                         f"are cut short", "head": None}]
    assert snap(rb, impl, max_descs=6)["anomalies"] == []


def test_several_anomalies_in_order(impl):
    rb = RingBuilder(16)
    a = rb.add_chain([(10, False), (20, True)])
    b = rb.add_indirect_chain([(10, False), (20, True)])
    c = rb.add_chain([(5, False)])
    rb.publish()
    rb.zero_len(rb.chain_ids(a)[0])
    rb.out_of_memory(rb.chain_ids(a)[1])
    rb.nest_indirect(b, 0)
    rb.corrupt_next(c, 200)
    s = snap(rb, impl)
    assert kinds(s) == ["zero_len", "addr_out_of_range", "nested_indirect", "next_out_of_range"]


def test_anomaly_kinds_match_c_codes():
    from inspector._vqd import lib
    for i, kind in enumerate(DECODER_KINDS):
        assert getattr(lib, "VQD_A_" + kind.upper()) == i
        assert AnomalyKind.by_code(i) is kind and kind.name == kind.upper()
    assert not hasattr(lib, f"VQD_A_{AnomalyKind.RING_UNMAPPED.name}")
    with pytest.raises(IndexError):
        AnomalyKind.by_code(len(DECODER_KINDS))


def test_random_garbage_ring_does_not_crash(impl):
    import random
    rng = random.Random(1234)
    for size in (1, 2, 64, 1024):
        rb = RingBuilder(size)
        desc, avail, used = rb.addrs
        end = used + 6 + 8 * size
        rb.mem.view(desc, end - desc)[:] = rng.randbytes(end - desc)
        for last in (None, rng.randrange(65536)):
            snap(rb, impl, last)


def test_worst_case_is_bounded_by_max_descs(impl):
    """Every slot of a 32768-entry queue names a chain that runs through the
    whole table into a loop of zero-length descriptors: the walk stops at
    max_descs listed descriptors (one ``truncated``), not 2^30."""
    size = 32768
    rb = RingBuilder(size, data_mem=0x1000)
    desc, avail, used = rb.addrs
    for i in range(size):
        rb.ring.write_desc(i, rb.data_gpa, 0, VRING_DESC_F_NEXT, (i + 1) % size)
    rb.ring.set_avail_idx(size)
    s = snap(rb, impl, max_descs=4 * size)
    assert len(s["chains"]) == size
    assert sum(len(c["descs"]) for c in s["chains"]) == 4 * size
    assert kinds(s).count("loop") == 4 and kinds(s).count("zero_len") == 4 * size
    assert kinds(s).count("truncated") == 1


# --- validate-only regions (remote reads, inspector.ring.remote) ---------------------

def _remote_view(rb: RingBuilder, extra: list[tuple[int, int]] = ()) -> GuestMemory:
    """What a remote read gives: copies of the three ring areas (and of the
    ``extra`` ranges) as readable regions, the builder's regions as
    validate-only guest memory."""
    mem = GuestMemory()
    desc, avail, used = rb.addrs
    for gpa, n in [(desc, 16 * rb.size), (avail, 6 + 2 * rb.size), (used, 6 + 8 * rb.size),
                   *extra]:
        mem.add(gpa, rb.mem.read(gpa, n))
    for r in rb.mem.regions:
        mem.add_valid(r.gpa, r.size)
    return mem


def test_buffers_in_validate_only_memory_are_valid(impl):
    """§2.7.5: a buffer is guest memory; validate-only regions are guest
    memory even though nothing is read from them."""
    rb = RingBuilder(8)
    rb.add_chain([(100, False), (200, True)])
    bad = rb.add_chain([(10, False)])
    rb.publish()
    rb.out_of_memory(bad)
    mem = _remote_view(rb)
    s, unread = impl.snapshot_split_pass(mem, 8, *rb.addrs, None)
    assert s == rb.snapshot(impl) and unread == []
    assert [a.kind for a in s.anomalies] == [AnomalyKind.ADDR_OUT_OF_RANGE]


def test_indirect_table_in_validate_only_memory_is_asked_for(impl):
    """The first pass cannot read the table: it names it (unread list and
    ``indirect_not_read``, which ends the chain); with the table added as a
    readable region the result equals the local decode."""
    rb = RingBuilder(8)
    direct = rb.add_chain([(100, False)])
    head = rb.add_indirect_chain([(10, False), (20, True), (30, True)])
    last = rb.add_chain([(5, True)])
    rb.publish()
    table = rb.tables[head]
    s, unread = impl.snapshot_split_pass(_remote_view(rb), 8, *rb.addrs, None)
    assert unread == [(table, 48)]
    detail = (f"desc[{head}] indirect table 0x{table:x} len 48 is guest memory that was not "
              f"read (head {head})")
    assert s.anomalies == [Anomaly(AnomalyKind.INDIRECT_NOT_READ, detail, head)]
    assert s.chain_head.tolist() == [direct, head, last] and s.chain_ndescs.tolist() == [1, 0, 1]
    s2, unread2 = impl.snapshot_split_pass(_remote_view(rb, [(table, 48)]), 8, *rb.addrs, None)
    assert unread2 == [] and s2 == rb.snapshot(impl)
    # a first pass that will be discarded need not build its snapshot
    assert impl.snapshot_split_pass(_remote_view(rb), 8, *rb.addrs, None,
                                    skip_if_unread=True) == (None, [(table, 48)])
    s3, _ = impl.snapshot_split_pass(_remote_view(rb, [(table, 48)]), 8, *rb.addrs, None,
                                     skip_if_unread=True)
    assert s3 == s2


def test_unread_tables_sorted_without_duplicates(impl):
    """The same table named by several chains (a head in several slots, or
    two descriptors pointing at one table) is asked for once; tables come
    sorted by (gpa, len)."""
    rb = RingBuilder(8)
    h1 = rb.add_indirect_chain([(10, False), (20, True)])
    h2 = rb.add_indirect_chain([(10, False)])
    h3 = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    rb.set_desc(h3, addr=rb.tables[h1])  # h3 shares h1's table
    rb.set_head(3, h2)
    rb.jump_avail_idx(1)
    _, unread = impl.snapshot_split_pass(_remote_view(rb), 8, *rb.addrs, None)
    assert unread == sorted({(rb.tables[h1], 32), (rb.tables[h2], 16)})


def test_indirect_table_outside_every_region_is_not_asked_for(impl):
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False)])
    rb.publish()
    rb.set_desc(head, addr=0xDEAD_0000_0000)
    s, unread = impl.snapshot_split_pass(_remote_view(rb), 8, *rb.addrs, None)
    assert unread == [] and [a.kind for a in s.anomalies] == [AnomalyKind.INDIRECT_OUT_OF_RANGE]
    assert s.anomalies[0].head == head


def test_readable_regions_take_precedence_and_may_overlap(impl):
    """A range is read from the first readable region holding ALL of it: a
    table that starts inside the copy of the driver area but runs past it
    is read from its own copy, not reported unreadable."""
    rb = RingBuilder(8)
    head = rb.add_indirect_chain([(10, False), (20, True)])
    rb.publish()
    # move the table so that it starts in the driver area (over the unused
    # avail->ring[6..7] and used_event) and runs past its end
    table = rb.addrs[1] + 16
    rb.mem.view(table, 32)[:] = rb.mem.read(rb.tables[head], 32)
    rb.set_desc(head, addr=table)
    _, unread = impl.snapshot_split_pass(_remote_view(rb), 8, *rb.addrs, None)
    assert unread == [(table, 32)]
    s, unread = impl.snapshot_split_pass(_remote_view(rb, [(table, 32)]), 8, *rb.addrs, None)
    assert unread == [] and s == rb.snapshot(impl) and s.n_descs == 2
    # validate-only memory listed first changes nothing
    mem = _remote_view(rb, [(table, 32)])
    mem.regions.sort(key=lambda r: r.readable)
    assert impl.snapshot_split_pass(mem, 8, *rb.addrs, None) == (s, [])


def test_ring_area_in_validate_only_memory_is_a_ring_error(impl):
    rb = RingBuilder(8)
    mem = GuestMemory()
    for r in rb.mem.regions:
        mem.add_valid(r.gpa, r.size)
    with pytest.raises(RingError, match="descriptor table at guest-physical"):
        impl.snapshot_split(mem, 8, *rb.addrs, None)


def test_guest_memory_reads_refuse_validate_only_regions():
    from inspector.errors import MemoryAccessError
    mem = GuestMemory()
    mem.add_valid(0x1000, 0x1000)
    mem.add(0x1800, bytearray(b"x" * 16))
    assert mem.read(0x1800, 16) == b"x" * 16  # readable region wins
    with pytest.raises(MemoryAccessError, match="not read"):
        mem.read(0x1000, 4)
    with pytest.raises(MemoryAccessError, match="runs past the end"):
        mem.read(0x1F00, 0x200)
    assert mem.uva_to_gpa(0x1004) == 0x1004
