"""Driver side of a split virtqueue (VIRTIO 1.2 §2.7.13), in Python.

This is the *driver's* half of a ring: it owns the descriptor table and the
avail ring and reads the used ring. vqscope's built-in vhost-user front-end
uses it to drive the back-end, and tests use it (through tests/support/ringbuilder.py)
to build rings, including hostile ones. It writes guest memory; nothing on
the inspector side ever does.

All multi-byte fields are little-endian (VIRTIO 1.x).
"""

from __future__ import annotations

import struct
import sys

from ..errors import InspectorError
from ..layout import split_layout
from ..memory import GuestMemory
from ..spec.virtio import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_SWAP = sys.byteorder != "little"


def _store_u16(view: memoryview, off: int, value: int) -> None:
    """Write the 16-bit field at ``off`` with ONE store. struct.pack_into
    zeroes its target before writing the bytes, so a device reading the
    field concurrently (``avail->idx``, ``used_event``) could see 0: our own
    back-end saw ``avail->idx 0`` mid-traffic and rightly broke the ring."""
    if _SWAP:
        value = int.from_bytes(value.to_bytes(2, "little"), "big")
    view[off:off + 2].cast("H")[0] = value


def _load_u16(view: memoryview, off: int) -> int:
    """Read the 16-bit field at ``off`` with ONE load (struct reads byte by
    byte: a field the device moves, ``used->idx``, could be read torn)."""
    value = view[off:off + 2].cast("H")[0]
    if _SWAP:
        value = int.from_bytes(value.to_bytes(2, "little"), "big")
    return value


class DriverRing:
    """A split ring of ``size`` entries laid out at guest-physical ``base``
    (legacy contiguous layout with ``align``) in ``mem``.

    Buffers are ``(addr, len, writable)`` triples of guest-physical ranges;
    ``writable`` buffers are device-writable (``VRING_DESC_F_WRITE``).
    """

    def __init__(self, mem: GuestMemory, base: int, size: int, align: int = 4096):
        self.mem = mem
        self.size = size
        self.layout = split_layout(size, align)
        self.desc_addr = base + self.layout.desc_offset
        self.avail_addr = base + self.layout.avail_offset
        self.used_addr = base + self.layout.used_offset
        self._view = mem.view(base, self.layout.total_size)
        self._view[:] = bytes(self.layout.total_size)
        self._free = list(range(size))
        self.avail_idx = 0  # shadow of avail->idx
        self.last_used_idx = 0
        self._chain_ids: dict[int, list[int]] = {}  # head -> descriptor ids

    # --- raw field access -------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` verbatim (no checks: tests use it to corrupt)."""
        _DESC.pack_into(self._view, self.layout.desc_offset + 16 * index, addr, length, flags, next_)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._view, self.layout.desc_offset + 16 * index)

    def _avail_off(self, field_index: int) -> int:
        return self.layout.avail_offset + 2 * field_index

    @property
    def avail_flags(self) -> int:
        return _load_u16(self._view, self._avail_off(0))

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        _store_u16(self._view, self._avail_off(0), value)

    def set_avail_ring(self, slot: int, head: int) -> None:
        _store_u16(self._view, self._avail_off(2 + slot), head)

    def set_avail_idx(self, value: int) -> None:
        """Publish ``avail->idx`` (also used by tests to jump it)."""
        self.avail_idx = value & 0xFFFF
        _store_u16(self._view, self._avail_off(1), self.avail_idx)

    @property
    def used_event(self) -> int:
        return _load_u16(self._view, self._avail_off(2 + self.size))

    @used_event.setter
    def used_event(self, value: int) -> None:
        _store_u16(self._view, self._avail_off(2 + self.size), value & 0xFFFF)

    @property
    def used_flags(self) -> int:
        return _load_u16(self._view, self.layout.used_offset)

    @property
    def used_idx(self) -> int:
        return _load_u16(self._view, self.layout.used_offset + 2)

    @property
    def avail_event(self) -> int:
        return _load_u16(self._view, self.layout.used_offset + 4 + 8 * self.size)

    # --- driver operations ---------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def add_chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Put a chain of descriptors on the ring (not yet published); returns
        the head. Raises InspectorError when the table has too few free
        descriptors."""
        if not buffers or len(buffers) > len(self._free):
            raise InspectorError(f"cannot add a chain of {len(buffers)} descriptors: "
                                 f"{len(self._free)} free of {self.size}")
        ids = [self._free.pop() for _ in buffers]
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
        self._chain_ids[ids[0]] = ids
        self.set_avail_ring(self.avail_idx % self.size, ids[0])
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return ids[0]

    def add_indirect_chain(self, table_addr: int, buffers: list[tuple[int, int, bool]]) -> int:
        """Write an indirect table of ``buffers`` at guest-physical
        ``table_addr`` and put one ``VRING_DESC_F_INDIRECT`` descriptor on the
        ring pointing to it (§2.7.5.3); returns the head."""
        table = self.mem.view(table_addr, 16 * len(buffers))
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            _DESC.pack_into(table, 16 * i, addr, length, flags, 0 if last else i + 1)
        if not self._free:
            raise InspectorError("cannot add an indirect chain: no free descriptor")
        head = self._free.pop()
        self.write_desc(head, table_addr, 16 * len(buffers), VRING_DESC_F_INDIRECT, 0)
        self._chain_ids[head] = [head]
        self.set_avail_ring(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make every chain added so far visible to the device (avail->idx)."""
        self.set_avail_idx(self.avail_idx)

    def get_used(self) -> list[tuple[int, int]]:
        """Collect the used entries the device added since the last call, as
        ``(id, len)``, and put their descriptors back on the free list."""
        out = []
        used_idx = self.used_idx
        while self.last_used_idx != used_idx:
            slot = self.last_used_idx % self.size
            head, length = _USED_ELEM.unpack_from(self._view, self.layout.used_offset + 4 + 8 * slot)
            ids = self._chain_ids.pop(head, None)
            if ids is None:
                raise InspectorError(f"device returned head {head}, which is not in flight")
            self._free.extend(ids)
            out.append((head, length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out
