"""Test-side builder of split rings, including hostile ones.

A :class:`RingBuilder` owns a :class:`~inspector.memory.GuestMemory` backed by
``bytearray`` regions and an :class:`~inspector.ring.driver.DriverRing` in it; it
adds chains (buffers and indirect tables are carved from a data area), plays
the device's used side, and corrupts the ring on purpose.
"""

from __future__ import annotations

import struct

from inspector.ring import reference
from inspector.ring.driver import DriverRing
from inspector.spec.virtio import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from inspector.layout import split_layout
from inspector.memory import GuestMemory
from inspector.ring.snapshot import RingSnapshot

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

RING_GPA = 0x10000
DATA_GPA = 0x100000


class RingBuilder:
    """A ring of ``size`` entries at ``ring_gpa`` in region 0 (``ring_mem``
    bytes) and a data region at ``data_gpa`` (``data_mem`` bytes) for
    buffers and indirect tables."""

    def __init__(self, size: int = 8, *, align: int = 4096, ring_gpa: int = RING_GPA,
                 ring_mem: int | None = None, data_gpa: int = DATA_GPA, data_mem: int = 0x40000):
        self.mem = GuestMemory()
        if ring_mem is None:
            ring_mem = (split_layout(size, align).total_size + 4095) & ~4095
        self.ring_buf = bytearray(ring_mem)
        self.mem.add(ring_gpa, self.ring_buf)
        self.data_buf = bytearray(data_mem)
        self.mem.add(data_gpa, self.data_buf)
        self.data_gpa = data_gpa
        self._cursor = data_gpa
        self.size = size
        self.ring = DriverRing(self.mem, ring_gpa, size, align)
        self.tables: dict[int, int] = {}  # indirect head -> table gpa
        self.table_entries: dict[int, int] = {}  # indirect head -> descriptors in its table

    # --- addresses --------------------------------------------------------
    @property
    def addrs(self) -> tuple[int, int, int]:
        return self.ring.desc_addr, self.ring.avail_addr, self.ring.used_addr

    def alloc(self, n: int) -> int:
        """``n`` bytes of the data region (16-aligned); returns their gpa."""
        gpa = self._cursor
        self._cursor = (self._cursor + max(n, 1) + 15) & ~15
        assert self._cursor <= self.data_gpa + len(self.data_buf), "data region full"
        return gpa

    def _buffers(self, spec) -> list[tuple[int, int, bool]]:
        """``spec``: (len, writable) pairs (buffers allocated here) or
        (addr, len, writable) triples (taken as they are)."""
        out = []
        for b in spec:
            if len(b) == 2:
                out.append((self.alloc(b[0]), b[0], b[1]))
            else:
                out.append(tuple(b))
        return out

    # --- driver operations ---------------------------------------------------
    def add_chain(self, spec=((64, False),)) -> int:
        return self.ring.add_chain(self._buffers(spec))

    def add_indirect_chain(self, spec=((64, False), (64, True))) -> int:
        bufs = self._buffers(spec)
        table = self.alloc(16 * len(bufs))
        head = self.ring.add_indirect_chain(table, bufs)
        self.tables[head] = table
        self.table_entries[head] = len(bufs)
        return head

    def publish(self) -> None:
        self.ring.publish()

    # --- device side (the used ring) ------------------------------------------
    def device_use(self, heads_lens: list[tuple[int, int]]) -> None:
        """Write used elements and advance used->idx, as a device would."""
        base = self.ring.used_addr
        idx = self.ring.used_idx
        for head, length in heads_lens:
            slot = idx % self.size
            _USED_ELEM.pack_into(self.mem.view(base + 4 + 8 * slot, 8), 0, head, length)
            idx = (idx + 1) & 0xFFFF
        self.set_used_idx(idx)

    def set_used_idx(self, value: int) -> None:
        _U16.pack_into(self.mem.view(self.ring.used_addr + 2, 2), 0, value & 0xFFFF)

    def set_used_flags(self, value: int) -> None:
        _U16.pack_into(self.mem.view(self.ring.used_addr, 2), 0, value)

    def set_avail_event(self, value: int) -> None:
        _U16.pack_into(self.mem.view(self.ring.used_addr + 4 + 8 * self.size, 2), 0, value)

    def start_at(self, idx: int) -> None:
        """Move both avail->idx and used->idx to ``idx`` (an empty ring that
        has seen ``idx`` buffers), e.g. to test wrap-around at 65535."""
        self.ring.set_avail_idx(idx)
        self.ring.last_used_idx = idx & 0xFFFF
        self.set_used_idx(idx)

    # --- corruption --------------------------------------------------------------
    def desc(self, index: int) -> tuple[int, int, int, int]:
        return self.ring.read_desc(index)

    def set_desc(self, index: int, *, addr=None, len=None, flags=None, next=None) -> None:
        """Overwrite fields of descriptor ``index`` (others kept)."""
        a, ln, f, n = self.ring.read_desc(index)
        self.ring.write_desc(index, a if addr is None else addr, ln if len is None else len,
                             f if flags is None else flags, n if next is None else next)

    def chain_ids(self, head: int) -> list[int]:
        return self.ring._chain_ids[head]

    def corrupt_next(self, index: int, next_: int) -> None:
        """Make descriptor ``index`` chain on to ``next_`` (NEXT set)."""
        a, ln, f, _ = self.ring.read_desc(index)
        self.ring.write_desc(index, a, ln, f | VRING_DESC_F_NEXT, next_)

    def set_head(self, slot: int, head: int) -> None:
        """Write ``head`` into avail->ring[slot]."""
        self.ring.set_avail_ring(slot, head)

    def make_loop(self, head: int, to: int | None = None) -> None:
        """Point the last descriptor of ``head``'s chain back at ``to``
        (default: the head itself)."""
        self.corrupt_next(self.chain_ids(head)[-1], head if to is None else to)

    def zero_len(self, index: int) -> None:
        self.set_desc(index, len=0)

    def out_of_memory(self, index: int, addr: int = 0xDEAD_0000_0000) -> None:
        """Point descriptor ``index`` at an address outside every region."""
        self.set_desc(index, addr=addr)

    def jump_avail_idx(self, delta: int) -> None:
        """Move avail->idx by ``delta`` without adding chains."""
        self.ring.set_avail_idx(self.ring.avail_idx + delta)

    # indirect tables
    def table_entry(self, head: int, j: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.mem.read(self.tables[head] + 16 * j, 16))

    def set_table_entry(self, head: int, j: int, *, addr=None, len=None, flags=None,
                        next=None) -> None:
        a, ln, f, n = self.table_entry(head, j)
        _DESC.pack_into(self.mem.view(self.tables[head] + 16 * j, 16), 0,
                        a if addr is None else addr, ln if len is None else len,
                        f if flags is None else flags, n if next is None else next)

    def nest_indirect(self, head: int, j: int = 0) -> None:
        """Set VRING_DESC_F_INDIRECT on entry ``j`` of ``head``'s table."""
        f = self.table_entry(head, j)[2]
        self.set_table_entry(head, j, flags=f | VRING_DESC_F_INDIRECT)

    # --- decoding -------------------------------------------------------------
    def snapshot(self, impl=reference, last_avail_idx: int | None = None, **kw) -> RingSnapshot:
        desc, avail, used = self.addrs
        return impl.snapshot_split(self.mem, self.size, desc, avail, used, last_avail_idx, **kw)


__all__ = ["RingBuilder", "VRING_DESC_F_INDIRECT", "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE"]
