"""Test-side builder of packed rings (VIRTIO 1.2 §2.8), including hostile ones.

A :class:`PackedRingBuilder` owns a :class:`~inspector.memory.GuestMemory`
of ``bytearray`` regions: the descriptor ring and the two event suppression
areas in region 0 (at ``RING_GPA``), buffers and indirect tables in a data
region. It plays the driver (``add_chain``, ``add_indirect_chain``: writes
descriptors in ring order with the AVAIL/USED bits of the round, the head's
flags last, and the buffer id in every descriptor as Linux does) and the
device (``device_take``, ``device_use``: one used descriptor per buffer at
next_used, then skip the buffer's descriptors, §2.8.9), and corrupts slots
on purpose (``set_desc``).
"""

from __future__ import annotations

import struct

from inspector.layout import packed_layout
from inspector.memory import GuestMemory
from inspector.ring import reference_packed
from inspector.ring.packed import PackedRingSnapshot, packed_counter, packed_position
from inspector.spec.virtio import (VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VRING_DESC_F_INDIRECT,
                                   VRING_DESC_F_NEXT, VRING_DESC_F_WRITE)

_PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
RING_GPA = 0x10000
DATA_GPA = 0x100000


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor the driver makes available in round ``wrap``."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_flags(wrap: int) -> int:
    """AVAIL/USED bits of a used descriptor written in round ``wrap``."""
    return VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0


class PackedRingBuilder:
    """A packed ring of ``size`` descriptors (any 1..32768)."""

    def __init__(self, size: int = 8, *, ring_gpa: int = RING_GPA, data_gpa: int = DATA_GPA,
                 data_mem: int = 0x40000):
        lay = packed_layout(size)
        self.size = size
        self.mem = GuestMemory()
        self.ring_buf = bytearray((lay.total_size + 4095) & ~4095)
        self.mem.add(ring_gpa, self.ring_buf)
        self.data_buf = bytearray(data_mem)
        self.mem.add(data_gpa, self.data_buf)
        self.data_gpa = data_gpa
        self._cursor = data_gpa
        self.desc = ring_gpa
        self.driver_event = ring_gpa + lay.driver_event_offset
        self.device_event = ring_gpa + lay.device_event_offset
        # driver
        self.next_avail, self.avail_wrap = 0, 1
        self.free_ids = list(range(size))
        self.ndescs: dict[int, int] = {}   # outstanding id -> descriptors (slots) it took
        self.tables: dict[int, int] = {}   # indirect id -> table gpa
        self.chain_slots: dict[int, int] = {}  # id -> first slot
        # device
        self.next_used, self.used_wrap = 0, 1
        self.last_avail, self.last_avail_wrap = 0, 1

    # --- memory ----------------------------------------------------------------
    @property
    def addrs(self) -> tuple[int, int, int]:
        return self.desc, self.driver_event, self.device_event

    @property
    def num_free(self) -> int:
        return self.size - sum(self.ndescs.values())

    def alloc(self, n: int) -> int:
        gpa = self._cursor
        self._cursor = (self._cursor + max(n, 1) + 15) & ~15
        assert self._cursor <= self.data_gpa + len(self.data_buf), "data region full"
        return gpa

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ``slot``."""
        return _PDESC.unpack_from(self.mem.view(self.desc + 16 * slot, 16), 0)

    def write_desc(self, slot: int, addr: int, length: int, id_: int, flags: int) -> None:
        _PDESC.pack_into(self.mem.view(self.desc + 16 * slot, 16), 0, addr, length, id_, flags)

    def set_desc(self, slot: int, *, addr=None, len=None, id=None, flags=None) -> None:
        """Overwrite fields of ``slot`` (others kept)."""
        a, ln, i, f = self.read_desc(slot)
        self.write_desc(slot, a if addr is None else addr, ln if len is None else len,
                        i if id is None else id, f if flags is None else flags)

    def set_event(self, which: str, off: int, wrap: int, flags: int) -> None:
        """Write the ``"driver"`` or ``"device"`` event suppression area."""
        gpa = self.driver_event if which == "driver" else self.device_event
        struct.pack_into("<HH", self.mem.view(gpa, 4), 0, off | wrap << 15, flags)

    def _buffers(self, spec) -> list[tuple[int, int, bool]]:
        return [(self.alloc(b[0]), b[0], b[1]) if len(b) == 2 else tuple(b) for b in spec]

    # --- driver ------------------------------------------------------------------
    def _write_chain(self, descs: list[tuple[int, int, int]], id_: int | None = None) -> int:
        """Make ``descs`` ((addr, len, flags without AVAIL/USED)) available
        as one buffer at next_avail: the head's flags are written last."""
        n = len(descs)
        assert 0 < n <= self.num_free, f"{n} descriptors, {self.num_free} free"
        if id_ is None:
            id_ = self.free_ids.pop(0)
        c0 = packed_counter(self.next_avail, self.avail_wrap, self.size)
        writes = []
        for k, (addr, length, flags) in enumerate(descs):
            slot, wrap = packed_position(c0 + k, self.size)
            f = flags | (VRING_DESC_F_NEXT if k < n - 1 else 0) | avail_flags(wrap)
            writes.append((slot, addr, length, id_, f))
        for w in writes[1:] + writes[:1]:  # §2.8.21.1: the head last
            self.write_desc(*w)
        self.ndescs[id_] = n
        self.chain_slots[id_] = self.next_avail
        self.next_avail, self.avail_wrap = packed_position(c0 + n, self.size)
        return id_

    def add_chain(self, spec=((64, False),)) -> int:
        """A direct chain of ``spec`` buffers ((len, writable) or (addr, len,
        writable)); returns its buffer id."""
        return self._write_chain([(a, ln, VRING_DESC_F_WRITE if wr else 0)
                                  for a, ln, wr in self._buffers(spec)])

    def add_indirect_chain(self, spec=((64, False), (64, True))) -> int:
        """One indirect descriptor whose table (§2.8.7) holds ``spec``."""
        bufs = self._buffers(spec)
        table = self.alloc(16 * len(bufs))
        for j, (a, ln, wr) in enumerate(bufs):
            _PDESC.pack_into(self.mem.view(table + 16 * j, 16), 0, a, ln, 0,
                             VRING_DESC_F_WRITE if wr else 0)
        id_ = self._write_chain([(table, 16 * len(bufs), VRING_DESC_F_INDIRECT)])
        self.tables[id_] = table
        return id_

    # --- device --------------------------------------------------------------------
    def device_take(self, n_descs: int) -> None:
        """The device reads ``n_descs`` more descriptors (moves last_avail)."""
        c = packed_counter(self.last_avail, self.last_avail_wrap, self.size) + n_descs
        self.last_avail, self.last_avail_wrap = packed_position(c, self.size)

    def device_use(self, ids_lens: list[tuple[int, int]]) -> None:
        """Return buffers: one used descriptor each at next_used (AVAIL =
        USED = used_wrap_counter), skipping the buffer's descriptors
        (§2.8.9); the driver then frees their ids."""
        for id_, length in ids_lens:
            self.write_desc(self.next_used, 0, length, id_, used_flags(self.used_wrap))
            n = self.ndescs.pop(id_, 1)
            c = packed_counter(self.next_used, self.used_wrap, self.size) + n
            self.next_used, self.used_wrap = packed_position(c, self.size)
            self.free_ids.append(id_)

    # --- decoding ---------------------------------------------------------------------
    def positions(self, mode: str) -> dict:
        """Keyword arguments of snapshot_packed for ``mode`` "device",
        "derived" (bare slots) or "flags" (none)."""
        if mode == "device":
            return dict(next_used=self.next_used, used_wrap_counter=self.used_wrap,
                        last_avail_idx=self.last_avail, last_avail_wrap_counter=self.last_avail_wrap)
        if mode == "derived":
            return dict(next_used=self.next_used, last_avail_idx=self.last_avail)
        return {}

    def snapshot(self, impl=reference_packed, mode: str = "device", **kw) -> PackedRingSnapshot:
        return impl.snapshot_packed(self.mem, self.size, *self.addrs, **{**self.positions(mode), **kw})


__all__ = ["PackedRingBuilder", "avail_flags", "used_flags", "VRING_DESC_F_INDIRECT",
           "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE"]
