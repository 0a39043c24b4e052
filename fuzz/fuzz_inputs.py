"""The libFuzzer harnesses' input formats, in Python.

:func:`decoder_case` reads an input of ``fuzz/fuzz_decoder.c`` (its header
comment is the format's definition) into the arguments of
:func:`inspector.decoder.snapshot_split_pass` / :func:`inspector.reference.snapshot_split_pass`,
so that a crash file can be replayed through the Python wrapper and checked
against the pure-Python reference. :func:`encode_decoder_input` goes the
other way, from a :class:`~inspector.memory.GuestMemory` of readable
``bytearray`` regions (e.g. a ``tests.support.ringbuilder.RingBuilder``'s), to make
seed inputs. :func:`replay_decoder_dir` runs every input of a directory
through both decoders and returns the inputs on which they disagree.

:func:`packed_case` / :func:`encode_packed_input` do the same for
``fuzz/fuzz_decoder_packed.c`` and the packed decoders.

Run as ``python -m fuzz.fuzz_inputs seeds DIR`` (or ``packed-seeds DIR``,
``datapath-seeds DIR``) to (re)write a checked-in seed corpus, or ``python
-m fuzz.fuzz_inputs replay DIR...`` (``replay-packed DIR...``) for the
differential replay (``make fuzz`` does both).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from inspector.memory import GuestMemory

DEC_HDR_LEN = 152
U64_MASK = (1 << 64) - 1


def _le(hdr: bytes, off: int, n: int) -> int:
    return int.from_bytes(hdr[off:off + n], "little")


def fill_region(mem: bytes, off: int, size: int) -> bytearray:
    """``size`` bytes ``mem[(off + k) % len(mem)]`` (zeros for no memory):
    fuzz_input.h fill_region."""
    if not mem:
        return bytearray(size)
    o = off % len(mem)
    period = mem[o:] + mem[:o]
    reps = -(-size // len(period)) if size else 0
    return bytearray((period * reps)[:size])


def region_size(raw: int) -> int:
    """The readable region size of a raw u32 (fuzz_decoder.c)."""
    top = raw >> 24
    if top == 0x5A:
        return raw & 0xFFFFF
    if top == 0xA5:
        return raw & 0xFFFF
    return raw & 0xFFF


@dataclass
class DecoderCase:
    """The arguments fuzz_decoder.c passes to vqd_snapshot, as the Python
    decoders take them (``last_avail_idx`` None for -1)."""

    mem: GuestMemory
    size: int
    desc: int
    avail: int
    used: int
    last_avail_idx: int | None
    max_descs: int

    def run(self, impl):
        """``impl.snapshot_split_pass(...)`` (impl: inspector.ring.decoder or inspector.ring.reference)."""
        return impl.snapshot_split_pass(self.mem, self.size, self.desc, self.avail, self.used,
                                        self.last_avail_idx, max_descs=self.max_descs)


def decoder_case(data: bytes) -> DecoderCase:
    """Read a fuzz_decoder.c input. Readable regions come first in the
    GuestMemory (in table order), then the validate-only ones: the decoders
    look them up as two separate tables, so the order between the two kinds
    does not matter."""
    hdr = bytes(data[:DEC_HDR_LEN]).ljust(DEC_HDR_LEN, b"\0")
    mem = bytes(data[DEC_HDR_LEN:])
    size_code = hdr[0]
    if size_code & 0x70 == 0x70:
        size = _le(hdr, 12, 4)
    else:
        size = 1 << ((size_code & 7) + (8 if size_code & 0xF8 == 0x88 else 0))
    last = None if hdr[4] & 1 else _le(hdr, 2, 2)
    gm, areas, max_descs = _memory_and_areas(hdr, mem)
    return DecoderCase(gm, size, *areas, last, max_descs)


def _memory_and_areas(hdr: bytes, mem: bytes) -> tuple[GuestMemory, list[int], int]:
    """The regions (readable first, in table order, then validate-only),
    the three area addresses and max_descs of a fuzz_decoder.c or
    fuzz_decoder_packed.c header (the same offsets in both)."""
    nr, nv = (hdr[1] & 7) % 5, (hdr[1] >> 3) & 3
    max_descs = _le(hdr, 6, 2)
    if hdr[5] & 15 != 5:
        max_descs &= 0xFF
    gm = GuestMemory()
    readable = []
    for i in range(nr):
        base = 40 + 16 * i
        gpa, rsize = _le(hdr, base, 8), region_size(_le(hdr, base + 8, 4))
        gm.add(gpa, fill_region(mem, _le(hdr, base + 12, 4), rsize), size=rsize)
        readable.append((gpa, rsize))
    for i in range(nv):
        base = 104 + 16 * i
        gm.add_valid(_le(hdr, base, 8), _le(hdr, base + 8, 8))
    areas = []
    for a in range(3):
        mode, val = hdr[8 + a], _le(hdr, 16 + 8 * a, 8)
        if mode & 1 or nr == 0:
            areas.append(val)
        else:
            gpa, rsize = readable[(mode >> 1) % nr]
            areas.append((gpa + val % (rsize + 1)) & U64_MASK)
    return gm, areas, max_descs


def _size_code(size: int) -> int:
    exp = size.bit_length() - 1
    if size != 1 << exp or exp > 15:
        raise ValueError(f"queue size {size} is not a power of two up to 32768")
    return exp if exp < 8 else 0x88 | (exp - 8)


def _region_raw(size: int) -> int:
    if size <= 0xFFF:
        return size
    if size <= 0xFFFF:
        return 0xA5 << 24 | size
    if size <= 0xFFFFF:
        return 0x5A << 24 | size
    raise ValueError(f"region of {size} bytes: the format holds at most 0xfffff")


def encode_decoder_input(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                         last_avail_idx: int | None = None, max_descs: int = 0xFF) -> bytes:
    """A fuzz_decoder.c input for these decoder arguments: at most 4
    readable regions (bytes copied into the input's memory) and 3
    validate-only ones; areas as raw addresses."""
    hdr = bytearray(DEC_HDR_LEN)
    hdr[0] = _size_code(size)
    if last_avail_idx is None:
        hdr[4] = 1
    else:
        struct.pack_into("<H", hdr, 2, last_avail_idx)
    if max_descs > 0xFF:
        hdr[5] = 5
    struct.pack_into("<H", hdr, 6, max_descs)
    return _encode_memory_and_areas(hdr, mem, (desc, avail, used))


def _encode_memory_and_areas(hdr: bytearray, mem: GuestMemory, areas) -> bytes:
    """Fill the region and area fields of ``hdr`` (raw area addresses) and
    append the readable regions' bytes: the shared part of both formats."""
    readable = [r for r in mem.regions if r.buf is not None]
    valid = [r for r in mem.regions if r.buf is None]
    if len(readable) > 4 or len(valid) > 3:
        raise ValueError("the format holds at most 4 readable and 3 validate-only regions")
    hdr[1] = len(readable) | len(valid) << 3
    hdr[8:11] = b"\1\1\1"
    struct.pack_into("<QQQ", hdr, 16, *areas)
    body = bytearray()
    for i, r in enumerate(readable):
        data = bytes(memoryview(r.buf).cast("B")[r.buf_offset:r.buf_offset + r.size])
        struct.pack_into("<QII", hdr, 40 + 16 * i, r.gpa, _region_raw(r.size), len(body))
        body += data
    for i, r in enumerate(valid):
        struct.pack_into("<QQ", hdr, 104 + 16 * i, r.gpa, r.size)
    return bytes(hdr + body)


@dataclass
class PackedCase:
    """The arguments fuzz_decoder_packed.c passes to vqd_snapshot_packed,
    as the Python decoders take them (None for -1)."""

    mem: GuestMemory
    size: int
    desc: int
    driver_event: int
    device_event: int
    positions: dict
    max_descs: int

    def run(self, impl):
        """``impl.snapshot_packed_pass(...)`` (inspector.ring.decoder or inspector.ring.reference_packed)."""
        return impl.snapshot_packed_pass(self.mem, self.size, self.desc, self.driver_event,
                                         self.device_event, max_descs=self.max_descs, **self.positions)


def packed_case(data: bytes) -> PackedCase:
    """Read a fuzz_decoder_packed.c input (its header comment is the format)."""
    hdr = bytes(data[:DEC_HDR_LEN]).ljust(DEC_HDR_LEN, b"\0")
    code = hdr[0]
    if code & 0xC0 == 0xC0:
        size = _le(hdr, 12, 2)
    elif code & 0x80:
        size = (_le(hdr, 12, 2) & 0x7FFF) + 1
    else:
        size = (code & 0x3F) + 1
    pf = hdr[4]
    nu, la = _le(hdr, 2, 2), _le(hdr, 14, 2)
    if not pf & 0x40:
        msize = size if 0 < size <= 32768 else 1
        nu, la = nu % msize, la % msize
    positions = {"next_used": nu if pf & 1 else None,
                 "used_wrap_counter": pf >> 4 & 1 if pf & 2 else None,
                 "last_avail_idx": la if pf & 4 else None,
                 "last_avail_wrap_counter": pf >> 5 & 1 if pf & 8 else None}
    gm, areas, max_descs = _memory_and_areas(hdr, bytes(data[DEC_HDR_LEN:]))
    return PackedCase(gm, size, *areas, {k: v for k, v in positions.items() if v is not None}, max_descs)


def encode_packed_input(mem: GuestMemory, size: int, desc: int, driver_event: int, device_event: int,
                        positions: dict, max_descs: int = 0xFF) -> bytes:
    """A fuzz_decoder_packed.c input for these decoder arguments
    (``positions``: the keyword arguments of snapshot_packed)."""
    hdr = bytearray(DEC_HDR_LEN)
    if size <= 64:
        hdr[0] = size - 1
    else:
        hdr[0] = 0x80
        struct.pack_into("<H", hdr, 12, size - 1)
    pf = 0
    for bit, key in ((1, "next_used"), (2, "used_wrap_counter"), (4, "last_avail_idx"),
                     (8, "last_avail_wrap_counter")):
        if positions.get(key) is not None:
            pf |= bit
    pf |= (positions.get("used_wrap_counter") or 0) << 4 | (positions.get("last_avail_wrap_counter") or 0) << 5
    hdr[4] = pf
    struct.pack_into("<H", hdr, 2, positions.get("next_used") or 0)
    struct.pack_into("<H", hdr, 14, positions.get("last_avail_idx") or 0)
    if max_descs > 0xFF:
        hdr[5] = 5
    struct.pack_into("<H", hdr, 6, max_descs)
    return _encode_memory_and_areas(hdr, mem, (desc, driver_event, device_event))


def write_packed_seeds(out: str | Path) -> int:
    """Seeds of the packed harness, built with tests/support/packed_ringbuilder.py:
    well-formed rings (plain, indirect, across the ring end, full, out of
    order; device, derived and flags positions; odd sizes) and one per
    hostile kind; returns how many."""
    from tests.support.packed_ringbuilder import PackedRingBuilder, used_flags

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, bytes] = {}

    def add(name, rb, mode="device", max_descs=0xFF):
        seeds[name] = encode_packed_input(rb.mem, rb.size, *rb.addrs, rb.positions(mode), max_descs)

    def builder(size=8):
        return PackedRingBuilder(size, data_mem=0x400)

    def busy(size=8):
        rb = builder(size)
        a = rb.add_chain(((16, False), (16, True)))
        b = rb.add_indirect_chain(((8, False), (8, True)))
        rb.add_chain()
        rb.device_take(3)
        rb.device_use([(b, 8)])
        rb.add_chain(((4, True),))
        rb.ids = (a, b)
        return rb

    for mode in ("device", "derived", "flags"):
        add(f"plain_{mode}", busy(), mode)
    rb = builder(5)
    for _ in range(4):
        i = rb.add_chain(((8, False), (8, True)))
        rb.device_take(2)
        rb.device_use([(i, 8)])
    rb.add_chain(((8, False), (8, False), (8, True)))
    add("across_the_end", rb, "derived")
    rb = builder(4)
    for _ in range(4):
        rb.add_chain()
    add("full", rb, "derived")
    rb = builder(13)
    for _ in range(5):
        rb.add_chain(((8, False), (8, True)))
    rb.device_take(4)
    rb.device_use([(3, 0), (1, 8)])
    add("out_of_order_size13", rb, "derived")
    rb = PackedRingBuilder(300, data_mem=0x100)
    rb.add_chain()
    add("size300", rb, "flags")
    hostile = {
        "id_out_of_range": lambda rb: rb.set_desc(1, id=200),
        "avail_used_pattern": lambda rb: rb.set_desc(6, flags=0x80),
        "used_not_available": lambda rb: rb.set_desc(0, flags=used_flags(1)),
        "zero_len": lambda rb: rb.set_desc(0, len=0),
        "addr_out_of_range": lambda rb: rb.set_desc(0, addr=0xDEAD_0000_0000),
        "indirect_len": lambda rb: rb.set_desc(2, len=24),
        "indirect_with_next": lambda rb: rb.set_desc(2, flags=rb.read_desc(2)[3] | 1),
        "nested_indirect": lambda rb: rb.mem.view(rb.tables[rb.ids[1]] + 14, 2).__setitem__(slice(0, 2), b"\4\0"),
    }
    for name, corrupt in hostile.items():
        rb = builder()
        a = rb.add_chain(((16, False), (16, True)))
        b = rb.add_indirect_chain(((8, False), (8, True)))
        rb.add_chain()
        rb.ids = (a, b)
        corrupt(rb)
        add(name, rb, "device")
    rb = builder(4)
    rb.add_chain([(8, False)] * 4)
    rb.set_desc(3, flags=rb.read_desc(3)[3] | 1)   # NEXT on all 4: longer than the ring
    add("chain_too_long", rb, "device")
    for name, data in seeds.items():
        (out / f"seed-{name}").write_bytes(data)
    return len(seeds)


def outcome(impl, case: DecoderCase):
    """("ok", as_dict, unread) or ("error", type name, message): what the
    differential test compares (tests/unit/test_decoder_diff.py)."""
    from inspector.errors import InspectorError

    try:
        snap, unread = case.run(impl)
    except InspectorError as e:
        return ("error", type(e).__name__, str(e))
    return ("ok", snap.as_dict(), unread)


def replay_decoder_dir(*dirs: str | Path, limit: int | None = None,
                       packed: bool = False) -> tuple[int, list[Path]]:
    """Run each input file of ``dirs`` through inspector.ring.decoder and
    inspector.ring.reference (``packed``: inputs of fuzz_decoder_packed.c,
    through the packed decoders); returns (inputs run, inputs whose
    outcomes differ)."""
    from inspector.ring import decoder, reference, reference_packed

    read, ref = (packed_case, reference_packed) if packed else (decoder_case, reference)

    n, bad = 0, []
    for d in dirs:
        for f in sorted(Path(d).iterdir()):
            if not f.is_file():
                continue
            if limit is not None and n >= limit:
                return n, bad
            case = read(f.read_bytes())
            n += 1
            if outcome(decoder, case) != outcome(ref, case):
                bad.append(f)
    return n, bad


def write_seeds(out: str | Path) -> int:
    """Write seed inputs built with tests/support/ringbuilder.py: a well-formed ring
    of each flavour (plain, indirect, wrapped indices, big queue, validate-only
    buffers) and one per hostile kind the decoder reports; returns how many."""
    from tests.support.ringbuilder import RingBuilder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, bytes] = {}

    def add(name, rb, last=None, max_descs=0xFF):
        seeds[name] = encode_decoder_input(rb.mem, rb.size, *rb.addrs, last, max_descs)

    def builder(size=8, data=0x300):
        return RingBuilder(size, align=16, ring_mem=16 * size + 6 + 2 * size + 16 + 6 + 8 * size + 16,
                           data_mem=data)

    rb = builder()
    rb.add_chain(((64, False), (64, True)))
    rb.add_chain()
    rb.publish()
    add("plain", rb)
    rb = builder()
    rb.add_indirect_chain(((32, False), (32, True), (32, True)))
    rb.add_chain(((16, True),))
    rb.publish()
    add("indirect", rb, last=0)
    rb = builder(4)
    rb.start_at(0xFFFE)
    for _ in range(3):
        rb.add_chain(((8, False),))
    rb.publish()
    add("wrap", rb, last=0xFFFE)
    rb = builder(128, data=0x800)
    for _ in range(60):
        rb.add_chain(((4, False), (4, True)))
    rb.publish()
    add("size128", rb, max_descs=300)
    rb = builder(256, data=0x100)
    rb.add_chain(((16, False),))
    rb.publish()
    add("size256", rb)
    hostile = {
        "loop": lambda rb, h: rb.make_loop(h),
        "next_out_of_range": lambda rb, h: rb.corrupt_next(rb.chain_ids(h)[-1], 200),
        "head_out_of_range": lambda rb, h: rb.set_head(0, 77),
        "zero_len": lambda rb, h: rb.zero_len(h),
        "addr_out_of_range": lambda rb, h: rb.out_of_memory(h),
        "avail_idx_jump": lambda rb, h: rb.jump_avail_idx(40),
    }
    for name, corrupt in hostile.items():
        rb = builder()
        h = rb.add_chain(((16, False), (16, True)))
        rb.add_chain()
        rb.publish()
        corrupt(rb, h)
        add(name, rb, last=0)
    rb = builder()
    h = rb.add_indirect_chain()
    rb.publish()
    rb.nest_indirect(h)
    add("nested_indirect", rb, last=0)
    rb = builder()
    h = rb.add_indirect_chain()
    rb.publish()
    rb.set_table_entry(h, 0, next=9, flags=1)
    add("indirect_next_out_of_range", rb, last=0)
    rb = builder()
    h = rb.add_indirect_chain()
    rb.publish()
    rb.set_desc(h, len=24)
    add("indirect_len", rb, last=0)
    # buffers and an indirect table in validate-only memory
    rb = builder()
    plain = rb.add_chain(((16, False),))
    indirect = rb.add_indirect_chain()
    rb.publish()
    rb.mem.add_valid(0x200000, 0x1000)
    rb.set_desc(plain, addr=0x200100)
    rb.set_desc(indirect, addr=0x200800)
    add("validate_only", rb, last=0)
    for name, data in seeds.items():
        (out / f"seed-{name}").write_bytes(data)
    return len(seeds)


DP_HDR_LEN = 128
DP_RING_GPA = 0x10000
DP_DATA_GPA = 0x40000


def op(code: int, arg: int = 0) -> int:
    """One script byte of fuzz_datapath.c: op ``code`` (0..15), ``arg`` (0..15)."""
    return code | arg << 4


def encode_datapath_input(ring_buf: bytes, data_buf: bytes, size: int, areas, *, flags: int = 0,
                          last_avail=(0, 0), ops: bytes = b"", inflight: bytes = b"",
                          iotlb: tuple[int, int, int] | None = None) -> bytes:
    """A fuzz_datapath.c input: region 0 is ``ring_buf`` at DP_RING_GPA,
    region 1 ``data_buf`` at DP_DATA_GPA; ``areas`` the (desc, avail, used)
    offsets in region 0 of vq 0 and vq 1; ``ops`` the script (at most 24);
    ``inflight`` the start of vq 0's inflight area (zeros after it; used
    with flags bit 4); ``iotlb`` the (mode, mask, perms) header bytes 124-126
    that put both vqs behind an IOTLB (fuzz_datapath.c says what they mean)."""
    hdr = bytearray(DP_HDR_LEN)
    hdr[0] = _size_code(size)
    hdr[1] = flags
    hdr[2] = 1  # two regions
    struct.pack_into("<HH", hdr, 4, *last_avail)
    struct.pack_into("<QII", hdr, 8, DP_RING_GPA, _region_raw(len(ring_buf)), 0)
    struct.pack_into("<QII", hdr, 24, DP_DATA_GPA, _region_raw(len(data_buf)), len(ring_buf))
    for k, off in enumerate(areas):
        struct.pack_into("<I", hdr, 72 + 4 * k, off << 2)  # region 0 of 2
    if len(ops) > 24:
        raise ValueError("at most 24 ops")
    hdr[96:96 + len(ops)] = ops
    struct.pack_into("<I", hdr, 120, len(ring_buf) + len(data_buf))  # inflight area: zeros after
    if iotlb is not None:
        hdr[124:127] = bytes(iotlb)
    return bytes(hdr + ring_buf + data_buf + inflight + bytes(64 + 16 * size))


def write_datapath_seeds(out: str | Path) -> int:
    """Seed inputs of fuzz_datapath.c: a TX ring with frames and an RX ring
    with buffers, run through loopback, pop/push and the tap paths, plus the
    hostile kinds (loop, head and next out of range, nested indirect, buffer
    outside memory, avail_idx jump, zero length)."""
    from inspector.ring.driver import DriverRing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = 8
    ring_len = 0x800
    seeds = {}
    traffic = bytes([op(6, 3), op(0, 2), op(1), op(0, 1), op(2, 1), op(3), op(3, 1), op(4, 2),
                     op(5), op(8, 3), op(7, 2), op(9, 2), op(0, 0), op(10), op(12), op(13), op(14)])

    def build(hostile=None, indirect=False, flags=0, iotlb=None):
        mem = GuestMemory()
        ring_buf, data_buf = bytearray(ring_len), bytearray(0x600)
        mem.add(DP_RING_GPA, ring_buf)
        mem.add(DP_DATA_GPA, data_buf)
        tx = DriverRing(mem, DP_RING_GPA, size, align=16)
        rx = DriverRing(mem, DP_RING_GPA + 0x400, size, align=16)
        cursor = DP_DATA_GPA
        heads = []
        for k in range(3):
            if indirect and k == 0:
                table = cursor
                cursor += 64
                heads.append(tx.add_indirect_chain(table, [(cursor, 12, False), (cursor + 12, 60, False)]))
            else:
                heads.append(tx.add_chain([(cursor, 12, False), (cursor + 12, 60, False)]))
            cursor += 128
        for _ in range(4):
            rx.add_chain([(cursor, 256, True)])
            cursor += 256
        tx.publish()
        rx.publish()
        if hostile:
            hostile(tx, heads)
        areas = [tx.desc_addr, tx.avail_addr, tx.used_addr, rx.desc_addr, rx.avail_addr, rx.used_addr]
        return encode_datapath_input(bytes(ring_buf), bytes(data_buf), size,
                                     [a - DP_RING_GPA for a in areas], flags=flags, ops=traffic, iotlb=iotlb)

    seeds["traffic"] = build()
    seeds["traffic-event-idx-mrg-inflight"] = build(flags=1 | 2 | 4 | 8 | 16 | 64)
    seeds["indirect"] = build(indirect=True)
    hostile = {
        "loop": lambda tx, h: tx.write_desc(h[0], DP_DATA_GPA, 12, 1, h[0]),
        "head_out_of_range": lambda tx, h: tx.set_avail_ring(0, 99),
        "next_out_of_range": lambda tx, h: tx.write_desc(h[0], DP_DATA_GPA, 12, 1, 50),
        "outside_memory": lambda tx, h: tx.write_desc(h[1], 0xDEAD0000, 12, 0, 0),
        "avail_idx_jump": lambda tx, h: tx.set_avail_idx(40),
        "zero_len": lambda tx, h: tx.write_desc(h[0], DP_DATA_GPA, 0, 0, 0),
        "indirect_bad_len": lambda tx, h: tx.write_desc(h[0], DP_DATA_GPA, 24, 4, 0),
    }
    for name, corrupt in hostile.items():
        seeds[name] = build(corrupt, flags=32 if name == "zero_len" else 0)
    # behind an IOTLB (VIRTIO_F_ACCESS_PLATFORM): 256-byte pieces all mapped RW (traffic moves
    # across piece boundaries); none mapped (every pop misses: nothing moves, nothing breaks);
    # the data region read-only (RX buffers refused: RX breaks, TX goes on)
    seeds["iotlb-traffic"] = build(iotlb=(1 | 1 << 1, 0xFF, 0))
    seeds["iotlb-miss"] = build(iotlb=(1, 0x00, 0))
    seeds["iotlb-write-ro"] = build(iotlb=(1 | 3 << 1, 0xFF, 3 | 1 << 2))
    for name, data in seeds.items():
        (out / f"seed-{name}").write_bytes(data)
    return len(seeds)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "seeds":
        print(f"wrote {write_seeds(argv[1])} seed inputs to {argv[1]}")
        return 0
    if len(argv) >= 2 and argv[0] == "datapath-seeds":
        print(f"wrote {write_datapath_seeds(argv[1])} seed inputs to {argv[1]}")
        return 0
    if len(argv) >= 2 and argv[0] == "packed-seeds":
        print(f"wrote {write_packed_seeds(argv[1])} seed inputs to {argv[1]}")
        return 0
    if len(argv) >= 2 and argv[0] in ("replay", "replay-packed"):
        packed = argv[0] == "replay-packed"
        n, bad = replay_decoder_dir(*argv[1:], packed=packed)
        print(f"{'packed ' if packed else ''}decoder replay: {n} inputs through inspector.ring.decoder "
              f"and the pure-Python reference, {len(bad)} differ")
        for f in bad:
            print(f"  differs: {f}")
        return 1 if bad else 0
    print("usage: python -m fuzz.fuzz_inputs seeds DIR | packed-seeds DIR | datapath-seeds DIR | "
          "replay DIR... | replay-packed DIR...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
