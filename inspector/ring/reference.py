"""Pure-Python reference of the split-ring snapshot decoder (VIRTIO 1.2 §2.7).

:func:`snapshot_split` here and in :mod:`inspector.ring.decoder` (C-backed)
return equal :class:`~inspector.ring.snapshot.RingSnapshot` objects (columns of integers;
``.as_dict()`` gives the dict of the Snapshot JSON) for the same memory;
the differential test (tests/unit/test_decoder_diff.py) holds them equal. This module mirrors
``inspector/csrc/vqd_decode.c`` step by step, in the same order, with the same
detail strings, filling ``array.array`` columns where the C fills its output
arrays: change both together. It is written to be read, not to be fast.

Semantics (both implementations):

- Regions are readable (``MemRegion.buf`` is a buffer) or validate-only
  (``buf`` is None: guest memory that exists but was not read locally, e.g.
  the rest of a QEMU's RAM around the ring areas gathered from
  ``/proc/PID/mem``). A range is *readable* when one readable region holds
  all of it (the first such region in table order); it is *valid* when it is
  readable or one validate-only region holds all of it. Readable regions
  thus take precedence where the two overlap, and regions may overlap.
- The three areas (descriptor table 16·size, driver area 6 + 2·size, device
  area 6 + 8·size bytes) must each be readable, else
  :class:`~inspector.errors.RingError` naming the area and address.
- Chains are the heads in ``avail->ring`` from ``last_avail_idx`` (or
  ``used->idx`` when it is None) up to ``avail->idx``, at most ``size`` heads
  (more is an ``avail_idx_jump``). Every walked slot gives one chain, even
  when its head is out of range (then with no descriptors); a head appearing
  in several slots is walked for each.
- A chain follows ``VRING_DESC_F_NEXT`` in the descriptor table, at most
  ``size`` descriptors. A ``VRING_DESC_F_INDIRECT`` descriptor ends the
  direct part (§2.7.5.3.2); it is not listed itself, the descriptors of its
  table are (one level; the table walk is bounded by its len / 16 entries).
- A chain with an anomaly is reported with the descriptors read before it.
- The whole snapshot lists at most ``max_descs`` descriptors; past that,
  one ``truncated`` anomaly and the remaining chains have no descriptors.
- ``zero_len`` and ``addr_out_of_range`` do not stop a walk; every other
  anomaly of a chain ends it.
- An anomaly's ``head`` is the head of the chain whose walk found it; it
  is None for ``avail_idx_jump``, ``head_out_of_range`` and ``truncated``
  (not inside a chain's walk).
- A buffer must be valid (else ``addr_out_of_range``). An indirect table
  must be readable: one that is valid but not readable ends its chain with
  ``indirect_not_read`` and is returned by :func:`snapshot_split_pass` as an
  unread table ``(gpa, len)``; the caller reads those tables, adds them as
  readable regions and decodes again (:mod:`inspector.ring.remote`), after which
  the anomaly is gone. A decode of readable regions only never reports it.
"""

from __future__ import annotations

import bisect
import struct
import sys
from array import array
from typing import Any

from ..memory import GuestMemory
from ..spec.virtio import VIRTQ_MAX_INDIRECT_LEN, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from .anomalies import DETAIL_MAX, Anomaly, AnomalyKind as K
from .checks import DEFAULT_MAX_DESCS, area_error, area_sizes, check_args, region_table, valid_table
from .snapshot import U16, U32, U64, RingSnapshot

_DESC = struct.Struct("<QIHH")  # struct virtq_desc (§2.7.5)
_U16 = struct.Struct("<H")

class _Mem:
    """Lookups over the region tables, like the C ``find_region``."""

    def __init__(self, table: list[tuple[int, int, Any, int]], valid: list[tuple[int, int]]):
        self.table = [(gpa, size, memoryview(buf).cast("B"), off) for gpa, size, buf, off in table]
        self.valid = valid

    def find(self, addr: int, length: int) -> tuple[memoryview, int] | None:
        """(view, offset) of ``[addr, addr + length)`` in the first readable
        region holding all of it, else None."""
        for gpa, size, view, off in self.table:
            if gpa <= addr < gpa + size and addr + length <= gpa + size:
                return view, off + addr - gpa
        return None

    def in_valid_only(self, addr: int, length: int) -> bool:
        """Does one validate-only region hold all of ``[addr, addr + length)``?"""
        return any(gpa <= addr < gpa + size and addr + length <= gpa + size
                   for gpa, size in self.valid)

    def is_valid(self, addr: int, length: int) -> bool:
        return self.find(addr, length) is not None or self.in_valid_only(addr, length)


def _column(code: str, view: memoryview, off: int, count: int) -> array:
    """``count`` little-endian integers of array typecode ``code`` at
    ``view[off:]``, copied (the driver may be writing concurrently)."""
    a = array(code)
    a.frombytes(view[off:off + count * a.itemsize])
    if sys.byteorder != "little":  # ring fields are little-endian (§2.7)
        a.byteswap()
    return a


class _Walk:
    """The walk state and records both references share (the C ``struct
    vqd_walk`` and csrc/vqd_decode_walk.c); ``packed`` selects the packed
    decoder's details (ring/reference_packed.py)."""

    def __init__(self, mem: _Mem, size: int, max_descs: int, packed: bool = False):
        self.mem = mem
        self.packed = packed
        # the word before a chain's number in details (C vqd_w_chain_word)
        self.chain_word = "chain at slot" if packed else "head"
        self.size = size
        self.max_descs = max_descs
        self.budget = max_descs
        self.truncated = False
        self.anomalies: list[Anomaly] = []
        self.unread: list[tuple[int, int]] = []  # C: out->want_addr / want_len, sorted
        self.desc_table: tuple[memoryview, int] = (memoryview(b""), 0)
        # the listed descriptors of all chains, in order (C: out->desc_*)
        self.desc_addr = array(U64)
        self.desc_len = array(U32)
        self.desc_flags = array(U16)
        self.desc_next = array(U16)
        # the chain being walked
        self.slot = 0
        self.head = 0
        self.ndescs = 0
        self.out_bytes = 0
        self.in_bytes = 0

    def anomaly(self, kind: K, detail: str, head: int | None) -> None:
        """Record an anomaly found in the walk of the chain of ``head``
        (None: not inside a chain's walk), like the C ``anomaly()``."""
        self.anomalies.append(Anomaly(kind, detail[:DETAIL_MAX], head))

    def budget_ok(self) -> bool:
        if self.budget:
            return True
        if not self.truncated:
            self.truncated = True
            if self.packed:
                self.anomaly(K.TRUNCATED,
                             f"snapshot lists at most {self.max_descs} descriptors: chain at slot "
                             f"{self.slot} and later chains are cut short", None)
            else:
                self.anomaly(K.TRUNCATED,
                             f"snapshot lists at most {self.max_descs} descriptors: chain of "
                             f"avail->ring[{self.slot}] (head {self.head}) and later chains are "
                             f"cut short", None)
        return False

    def emit(self, d: tuple[int, int, int, int], loc: str) -> None:
        addr, length, flags, next_ = d
        self.budget -= 1
        self.desc_addr.append(addr)
        self.desc_len.append(length)
        self.desc_flags.append(flags)
        self.desc_next.append(next_)
        self.ndescs += 1
        # §2.7.5: VRING_DESC_F_WRITE marks a device-writable buffer.
        if flags & VRING_DESC_F_WRITE:
            self.in_bytes += length
        else:
            self.out_bytes += length
        if length == 0:
            # §2.7.5: zero length carries no buffer; flagged, not forbidden.
            self.anomaly(K.ZERO_LEN, f"{loc}.len = 0 ({self.chain_word} {self.head})", self.head)
        elif not self.mem.is_valid(addr, length):
            # §2.7.5: the buffer is guest memory: inside one region.
            self.anomaly(K.ADDR_OUT_OF_RANGE,
                         f"{loc}.addr 0x{addr:x} len {length} is not inside one memory "
                         f"region ({self.chain_word} {self.head})", self.head)

    def indirect_table(self, di: int, d: tuple[int, int, int, int]) -> tuple[memoryview, int] | None:
        """(view, offset) of the indirect table of desc[di] (``d``), or None
        after recording why not (C vqd_w_indirect_table)."""
        addr, length = d[0], d[1]
        head, cw = self.head, self.chain_word
        # §2.7.5.3 / §2.8.7: desc[len / 16]; §2.7.5.3.1 + §2.7: at most 32768 entries.
        if length == 0 or length % 16 or length > VIRTQ_MAX_INDIRECT_LEN:
            self.anomaly(K.INDIRECT_LEN,
                         f"desc[{di}].len = {length} for an indirect table: not a non-zero "
                         f"multiple of 16 up to {VIRTQ_MAX_INDIRECT_LEN} ({cw} {head})", head)
            return None
        where = self.mem.find(addr, length)
        if where is None and self.mem.in_valid_only(addr, length):
            # Guest memory, but not read here: the caller reads it and decodes again.
            if (addr, length) not in self.unread:
                bisect.insort(self.unread, (addr, length))
            self.anomaly(K.INDIRECT_NOT_READ,
                         f"desc[{di}] indirect table 0x{addr:x} len {length} is guest memory "
                         f"that was not read ({cw} {head})", head)
            return None
        if where is None:
            # §2.7.5.3 / §2.8.7: the table is guest memory.
            self.anomaly(K.INDIRECT_OUT_OF_RANGE,
                         f"desc[{di}] indirect table 0x{addr:x} len {length} is not inside "
                         f"one memory region ({cw} {head})", head)
            return None
        return where

    def walk_indirect(self, di: int, d: tuple[int, int, int, int]) -> None:
        head = self.head
        where = self.indirect_table(di, d)
        if where is None:
            return
        length = d[1]
        view, off = where
        n = length // 16
        j = count = 0
        while True:
            # §2.7.5.2: loops are forbidden; longer than the table revisits.
            if count >= n:
                self.anomaly(K.LOOP, f"desc[{di}]->indirect chain is longer than its table of {n} "
                             f"entries: loop (head {head})", head)
                return
            if not self.budget_ok():
                return
            e = _DESC.unpack_from(view, off + 16 * j)
            count += 1
            if e[2] & VRING_DESC_F_INDIRECT:
                # §2.7.5.3.1: no INDIRECT within an indirect table.
                self.anomaly(K.NESTED_INDIRECT,
                             f"desc[{di}]->indirect[{j}].flags = 0x{e[2]:x} sets "
                             f"VRING_DESC_F_INDIRECT (head {head})", head)
                return
            self.emit(e, f"desc[{di}]->indirect[{j}]")
            if not e[2] & VRING_DESC_F_NEXT:
                return
            if e[3] >= n:
                self.anomaly(K.NEXT_OUT_OF_RANGE,
                             f"desc[{di}]->indirect[{j}].next = {e[3]} >= table entries {n} "
                             f"(head {head})", head)
                return
            j = e[3]

    def walk_chain(self, head: int) -> None:
        size = self.size
        # §2.7.6: heads index the descriptor table.
        if head >= size:
            self.anomaly(K.HEAD_OUT_OF_RANGE,
                         f"avail->ring[{self.slot}] = head {head} >= size {size}", None)
            return
        view, off = self.desc_table
        i = head
        count = 0
        while True:
            # §2.7.5.2: loops are forbidden; longer than the table revisits.
            if count >= size:
                self.anomaly(K.LOOP, f"chain from head {head} is longer than the descriptor table "
                             f"(size {size}): loop", head)
                return
            if not self.budget_ok():
                return
            d = _DESC.unpack_from(view, off + 16 * i)
            count += 1
            flags = d[2]
            if flags & VRING_DESC_F_INDIRECT:
                # §2.7.5.3.1: not INDIRECT and NEXT together; §2.7.5.3.2: the
                # indirect descriptor ends the chain and is not listed.
                if flags & VRING_DESC_F_NEXT:
                    self.anomaly(K.INDIRECT_WITH_NEXT,
                                 f"desc[{i}].flags = 0x{flags:x} sets both "
                                 f"VRING_DESC_F_INDIRECT and VRING_DESC_F_NEXT (head {head})", head)
                self.walk_indirect(i, d)
                return
            self.emit(d, f"desc[{i}]")
            if not flags & VRING_DESC_F_NEXT:
                return
            if d[3] >= size:
                self.anomaly(K.NEXT_OUT_OF_RANGE,
                             f"desc[{i}].next = {d[3]} >= size {size} (head {head})", head)
                return
            i = d[3]


def snapshot_split(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                   last_avail_idx: int | None, *,
                   max_descs: int = DEFAULT_MAX_DESCS) -> RingSnapshot:
    """Snapshot a split ring (pure Python); see the module docstring."""
    return snapshot_split_pass(mem, size, desc, avail, used, last_avail_idx,
                               max_descs=max_descs)[0]


def snapshot_split_pass(mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                        last_avail_idx: int | None, *, max_descs: int = DEFAULT_MAX_DESCS,
                        skip_if_unread: bool = False,
                        ) -> tuple[RingSnapshot | None, list[tuple[int, int]]]:
    """:func:`snapshot_split` and the indirect tables it could not read:
    ``(gpa, len)`` of each table that lies in validate-only memory, sorted,
    without duplicates; each chain that reached one has an
    ``indirect_not_read`` anomaly. With ``skip_if_unread``
    the snapshot is None when there are unread tables (a first pass whose
    result the caller would discard)."""
    check_args(size, desc, avail, used, last_avail_idx, max_descs)
    m = _Mem(region_table(mem), valid_table(mem))
    areas = []
    for i, (addr, length) in enumerate(zip((desc, avail, used), area_sizes(size))):
        where = m.find(addr, length)
        if where is None:
            raise area_error(i, addr, length)
        areas.append(where)
    (av, aoff), (uv, uoff) = areas[1], areas[2]
    avail_flags, avail_idx = struct.unpack_from("<HH", av, aoff)
    avail_ring = _column(U16, av, aoff + 4, size)
    used_event = _U16.unpack_from(av, aoff + 4 + 2 * size)[0]
    used_flags, used_idx = struct.unpack_from("<HH", uv, uoff)
    used_ring = _column(U32, uv, uoff + 4, 2 * size)  # id, len of each element
    avail_event = _U16.unpack_from(uv, uoff + 4 + 8 * size)[0]

    w = _Walk(m, size, max_descs)
    w.desc_table = areas[0]
    start = used_idx if last_avail_idx is None else last_avail_idx
    pending = (avail_idx - start) & 0xFFFF
    n = pending
    if pending > size:
        # §2.7.6 / §2.7.13.3: at most `size` heads can be available.
        name = "used->idx" if last_avail_idx is None else "last_avail_idx"
        w.anomaly(K.AVAIL_IDX_JUMP,
                  f"avail->idx {avail_idx} is {pending} ahead of {name} {start}, more than "
                  f"size {size}: walked {size} heads", None)
        n = size
    chain_head, chain_first, chain_ndescs = array(U32), array(U32), array(U32)
    chain_out_bytes, chain_in_bytes = array(U64), array(U64)
    for k in range(n):
        slot = (start + k) % size
        head = avail_ring[slot]
        w.slot, w.head = slot, head
        w.ndescs = w.out_bytes = w.in_bytes = 0
        chain_head.append(head)
        chain_first.append(len(w.desc_addr))
        w.walk_chain(head)
        chain_ndescs.append(w.ndescs)
        chain_out_bytes.append(w.out_bytes)
        chain_in_bytes.append(w.in_bytes)
    if skip_if_unread and w.unread:
        return None, w.unread
    return (RingSnapshot(
        size=size, avail_flags=avail_flags, avail_idx=avail_idx, used_event=used_event,
        used_flags=used_flags, used_idx=used_idx, avail_event=avail_event,
        last_avail_idx=last_avail_idx, avail_ring=avail_ring, used_ring=used_ring,
        desc_addr=w.desc_addr, desc_len=w.desc_len, desc_flags=w.desc_flags,
        desc_next=w.desc_next, chain_head=chain_head, chain_first=chain_first,
        chain_ndescs=chain_ndescs, chain_out_bytes=chain_out_bytes,
        chain_in_bytes=chain_in_bytes, anomalies=w.anomalies), w.unread)
