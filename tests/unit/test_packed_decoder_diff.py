"""Differential test of the packed decoders: the C one
(inspector.ring.decoder.snapshot_packed_pass) and the pure-Python reference
(inspector.ring.reference_packed) return equal PackedRingSnapshots (same
``as_dict()``, anomaly heads included, same columns) and the same unread
indirect tables, or raise the same error, for packed rings driven through
many rounds (out-of-order completions, indirect tables), then corrupted,
and for random bytes, over random region tables (readable and
validate-only) and every way of giving the device's positions."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from inspector.errors import InspectorError
from inspector.ring import decoder, reference_packed
from inspector.ring.packed import packed_counter, packed_distance
from inspector.spec.virtio import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from tests.support.packed_ringbuilder import PackedRingBuilder
from tests.unit.test_decoder_diff import SETTINGS, U64_END, split_regions

SIZES = st.sampled_from([1, 2, 3, 4, 5, 8, 13, 16, 64, 256])
SEEDS = st.integers(0, 2**64 - 1)


def outcome(impl, mem, size, addrs, kw, max_descs):
    try:
        r, unread = impl.snapshot_packed_pass(mem, size, *addrs, max_descs=max_descs, **kw)
    except InspectorError as e:
        return ("error", type(e).__name__, str(e)), None
    return ("ok", r.as_dict(), unread), r


def assert_same(mem, size, addrs, kw, max_descs):
    c, c_snap = outcome(decoder, mem, size, addrs, kw, max_descs)
    p, p_snap = outcome(reference_packed, mem, size, addrs, kw, max_descs)
    assert c == p
    if c_snap is not None:
        assert c_snap == p_snap
        assert c_snap.chains == p_snap.chains
        assert [{"head": ch.head, "slot": ch.slot, "descs": [{"addr": d.addr, "len": d.len,
                 "flags": d.flags, "id": d.next} for d in ch.descs], "out_bytes": ch.out_bytes,
                 "in_bytes": ch.in_bytes} for ch in c_snap.chains] == c[1]["chains"]
        assert c_snap.inflight <= 2 * size
        assert len(c_snap.chains) <= size
    return c


def builder(rng: random.Random, size: int) -> PackedRingBuilder:
    data_mem = 0x4000
    return PackedRingBuilder(size, data_gpa=rng.choice([0x100000, U64_END - data_mem]),
                             ring_gpa=rng.choice([0x10000, 0]), data_mem=data_mem)


def buffer(rng: random.Random, rb: PackedRingBuilder) -> tuple[int, int, bool]:
    length = 0 if rng.random() < 0.1 else rng.randrange(1, 300)
    return rb.data_gpa + rng.randrange(len(rb.data_buf) - 300), length, rng.random() < 0.5


def drive(rng: random.Random, rb: PackedRingBuilder) -> None:
    """Driver and device through up to a few rounds: chains added while
    descriptors are free, taken in order, completed out of order."""
    taken: list[int] = []   # ids the device took, not yet used
    order: list[int] = []   # ids in ring order
    for _ in range(rng.randrange(0, 4 * rb.size + 2)):
        op = rng.random()
        if op < 0.45 and rb.num_free and rb.free_ids:
            n = rng.randrange(1, min(4, rb.num_free) + 1)
            spec = [buffer(rng, rb) for _ in range(n)]
            if rng.random() < 0.25:
                rb._cursor = rb.data_gpa  # reuse the data region (tables may overlap: harmless)
                order.append(rb.add_indirect_chain(spec[:rng.randrange(1, 5)]))
            else:
                order.append(rb.add_chain(spec))
        elif op < 0.7 and order:
            i = order.pop(0)
            rb.device_take(rb.ndescs[i])
            taken.append(i)
        elif taken:
            i = taken.pop(rng.randrange(len(taken)) if rng.random() < 0.3 else 0)
            rb.device_use([(i, rng.randrange(100))])
        rb._cursor = rb.data_gpa if rb._cursor > rb.data_gpa + len(rb.data_buf) - 0x1000 else rb._cursor


def pick_positions(rng: random.Random, rb: PackedRingBuilder) -> dict:
    r = rng.random()
    if r < 0.3:
        return rb.positions("device")
    if r < 0.6:
        return rb.positions("derived")
    if r < 0.75:
        return {}
    if r < 0.85:
        kw = {"next_used": rng.randrange(rb.size)}
        if rng.random() < 0.5:
            kw["used_wrap_counter"] = rng.randrange(2)
            if rng.random() < 0.5:
                kw.update(last_avail_idx=rng.randrange(rb.size), last_avail_wrap_counter=rng.randrange(2))
        elif rng.random() < 0.5:
            kw["last_avail_idx"] = rng.randrange(rb.size)
        return kw
    # hostile arguments: both decoders must refuse them alike
    return rng.choice([{"next_used": rb.size}, {"used_wrap_counter": 1}, {"next_used": 0, "used_wrap_counter": 2},
                       {"last_avail_idx": 0}, {"next_used": 0, "last_avail_idx": 0, "last_avail_wrap_counter": 1},
                       {"next_used": -1}])


def pick_max_descs(rng: random.Random) -> int:
    return reference_packed.DEFAULT_MAX_DESCS if rng.random() < 0.8 else rng.randrange(0, 24)


@SETTINGS
@given(size=SIZES, seed=SEEDS)
def test_driven_then_corrupted(size, seed):
    rng = random.Random(seed)
    rb = builder(rng, size)
    drive(rng, rb)
    if rng.random() < 0.1:
        # the device positions must be consistent with what it did
        cu = packed_counter(rb.next_used, rb.used_wrap, size)
        cl = packed_counter(rb.last_avail, rb.last_avail_wrap, size)
        cn = packed_counter(rb.next_avail, rb.avail_wrap, size)
        assert packed_distance(cu, cl, size) <= packed_distance(cu, cn, size) <= size
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        slot = rng.randrange(size)
        op = rng.randrange(6)
        if op == 0:
            rb.set_desc(slot, flags=rng.randrange(65536))
        elif op == 1:
            rb.set_desc(slot, flags=rb.read_desc(slot)[3] ^ rng.choice([VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, 1, 4]))
        elif op == 2:
            rb.set_desc(slot, id=rng.choice([size, rng.randrange(65536)]))
        elif op == 3:
            rb.set_desc(slot, len=rng.choice([0, 15, 16, 17 * 16, 16 * 32768 + 16, rng.randrange(1 << 32)]))
        elif op == 4:
            rb.set_desc(slot, addr=rng.choice([rng.randrange(U64_END), U64_END - 8, rb.data_gpa]))
        elif rb.tables:
            t = rng.choice(list(rb.tables.values()))
            rb.mem.view(t + rng.randrange(16), 1)[0] = rng.randrange(256)
    mem = split_regions(rng, rb) if rng.random() < 0.4 else rb.mem
    assert_same(mem, size, rb.addrs, pick_positions(rng, rb), pick_max_descs(rng))


@SETTINGS
@given(size=SIZES, seed=SEEDS)
def test_random_bytes(size, seed):
    """The descriptor ring is random bytes, mostly with flags drawn from the
    AVAIL/USED/NEXT/WRITE/INDIRECT bits so that walks go somewhere."""
    rng = random.Random(seed)
    rb = builder(rng, size)
    rb.ring_buf[:] = rng.randbytes(len(rb.ring_buf))
    rb.data_buf[:] = rng.randbytes(len(rb.data_buf))
    bits = [1, 2, 4, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED]
    for slot in range(size):
        if rng.random() < 0.8:
            f = sum(b for b in bits if rng.random() < 0.4)
            addr = rb.data_gpa + rng.randrange(len(rb.data_buf) - 64) if rng.random() < 0.7 else rng.randrange(U64_END)
            rb.write_desc(slot, addr, rng.choice([16, 32, rng.randrange(1, 600)]), rng.randrange(size + 2), f)
    mem = split_regions(rng, rb) if rng.random() < 0.5 else rb.mem
    kw = pick_positions(rng, rb)
    assert_same(mem, size, rb.addrs, kw, pick_max_descs(rng))
