"""The front-end's memory as a back-end sees it: SET_MEM_TABLE's regions,
validated, mapped, and joined in one :class:`~inspector.memory.GuestMemory`.

vhost-user spec, "Memory region description" and SET_MEM_TABLE: each region
is ``memory_size`` bytes at a guest-physical and a front-end virtual address,
found at ``mmap_offset`` in the fd that comes with it. Everything the peer
says is checked before anything is mapped: sizes, 64-bit overflows, the fd's
size, overlaps between regions. A new table replaces the old one only once
it is wholly mapped; an old mapping that a reader still exports (a snapshot
holding a view) is kept and unmapped later, never yanked from under it.

ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS) are not offered, so the
table only changes whole.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from typing import Sequence

from ..memory import GuestMemory
from .protocol import MemoryRegionDesc, ProtocolViolation

PAGE = mmap.ALLOCATIONGRANULARITY
U64_MAX = (1 << 64) - 1


class FdMapping:
    """One MAP_SHARED mmap of ``size`` bytes at ``offset`` of ``fd`` (the
    offset need not be page-aligned: ``buf_offset`` is where the bytes start
    in ``map``). Raises OSError / ValueError as mmap does."""

    def __init__(self, fd: int, offset: int, size: int, *, writable: bool = True):
        start = offset - offset % PAGE
        self.buf_offset = offset - start
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, size + self.buf_offset, mmap.MAP_SHARED, prot, offset=start)

    def close(self) -> bool:
        """Unmap; False while some buffer still exports it (retry later)."""
        try:
            self.map.close()
            return True
        except BufferError:
            return False


def map_fd(name: str, field: str, fd: int, offset: int, size: int, *, writable: bool = True) -> FdMapping:
    """:class:`FdMapping`, a failure reported as the ProtocolViolation of
    request ``name``'s ``field``."""
    try:
        return FdMapping(fd, offset, size, writable=writable)
    except (OSError, ValueError) as e:
        raise ProtocolViolation(name, field, fd, f"mmap failed: {e}") from None


def fd_size(name: str, field: str, fd: int) -> int:
    """The size of what ``fd`` refers to (fstat), a failure reported as the
    ProtocolViolation of request ``name``'s ``field``."""
    try:
        return os.fstat(fd).st_size
    except OSError as e:
        raise ProtocolViolation(name, field, fd, f"fstat failed: {e.strerror}") from None


def check_regions(name: str, regions: Sequence[MemoryRegionDesc], fds: Sequence[int]) -> None:
    """Validate a memory table against its fds (one per region): no empty
    region, no 64-bit overflow of any range, each region inside its fd, no
    two regions overlapping in guest-physical or front-end virtual space."""
    for n, r in enumerate(regions):
        f = f"regions[{n}]"
        if r.memory_size == 0:
            raise ProtocolViolation(name, f"{f}.memory_size", 0, "a region cannot be empty")
        for fld, start in (("guest_phys_addr", r.guest_phys_addr), ("userspace_addr", r.userspace_addr),
                           ("mmap_offset", r.mmap_offset)):
            if start + r.memory_size - 1 > U64_MAX:
                raise ProtocolViolation(name, f"{f}.{fld}", start,
                                        f"+ memory_size {r.memory_size:#x} overflows 64 bits")
        size = fd_size(name, f"{f}.fd", fds[n])
        if r.mmap_offset + r.memory_size > size:
            raise ProtocolViolation(name, f"{f}.mmap_offset", r.mmap_offset,
                                    f"+ memory_size {r.memory_size:#x} runs past the end of the "
                                    f"fd ({size:#x} bytes)")
    for a in range(len(regions)):
        for b in range(a + 1, len(regions)):
            ra, rb = regions[a], regions[b]
            for fld, sa, sb in (("guest_phys_addr", ra.guest_phys_addr, rb.guest_phys_addr),
                                ("userspace_addr", ra.userspace_addr, rb.userspace_addr)):
                if sa < sb + rb.memory_size and sb < sa + ra.memory_size:
                    raise ProtocolViolation(name, f"regions[{b}].{fld}", sb,
                                            f"overlaps regions[{a}] ({sa:#x}+{ra.memory_size:#x})")


class MappedTable:
    """One memory table, mapped: ``maps`` (one FdMapping per region) and
    ``mem``, the GuestMemory over them. Made by :meth:`MappedMemory.map`."""

    def __init__(self, maps: list[FdMapping], mem: GuestMemory):
        self.maps = maps
        self.mem = mem

    def close(self) -> None:
        for m in self.maps:
            m.close()


class MappedMemory:
    """A connection's memory table: the GuestMemory in use (``mem``, None
    until the first SET_MEM_TABLE) and the mappings behind it.

    :meth:`map` validates and maps a new table without touching the one in
    use; :meth:`install` makes it current (the caller first stops the rings
    that used the old one). Mappings a reader still exports are kept in
    ``stale`` and retried at each install and at :meth:`close`.
    """

    def __init__(self, logger: logging.Logger, conn_id: int = 0):
        self.logger = logger
        self.id = conn_id
        self.mem: GuestMemory | None = None
        self.maps: list[FdMapping] = []
        self.stale: list[FdMapping] = []

    def map(self, name: str, regions: Sequence[MemoryRegionDesc], fds: Sequence[int], *,
            writable: bool = True) -> MappedTable:
        """Validate (:func:`check_regions`) and map ``regions`` from ``fds``
        (not closed here; PROT_READ only unless ``writable``).
        ProtocolViolation, with nothing left mapped, when the table is
        invalid or a region cannot be mapped."""
        check_regions(name, regions, fds)
        table = MappedTable([], GuestMemory())
        try:
            for n, r in enumerate(regions):
                m = map_fd(name, f"regions[{n}].fd", fds[n], r.mmap_offset, r.memory_size,
                           writable=writable)
                table.maps.append(m)
                # A memfd sealed against shrinking (F_SEAL_SHRINK) cannot
                # fault; any other region can be truncated under us: the
                # data path's accesses are SIGBUS-guarded (csrc/vqd_guard.c).
                try:
                    sealed = fcntl.fcntl(fds[n], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
                except OSError:  # not a memfd: no seals
                    sealed = 0
                self.logger.debug("connection %d: region %d (%#x+%#x) %s", self.id, n,
                                  r.guest_phys_addr, r.memory_size,
                                  "is sealed against shrinking (F_SEAL_SHRINK): it cannot fault" if sealed
                                  else "is not sealed against shrinking: data-path accesses are "
                                       "SIGBUS-guarded")
                table.mem.add(r.guest_phys_addr, m.map, uva=r.userspace_addr, size=r.memory_size,
                              buf_offset=m.buf_offset)
        except BaseException:
            table.close()
            raise
        return table

    def install(self, table: MappedTable) -> None:
        """Make ``table`` the one in use; unmap the previous one (or keep it
        in ``stale`` while a reader exports it)."""
        pending = self.maps + self.stale
        self.maps, self.mem = table.maps, table.mem
        self.stale = [m for m in pending if not m.close()]

    def close(self) -> None:
        """Unmap everything (mappings still exported are unmapped when their
        last user releases them); ``mem`` is None afterwards."""
        for m in self.maps + self.stale:
            if not m.close():
                self.logger.warning("connection %d: a memory region is still in use; it will be "
                                    "unmapped when its last user releases it", self.id)
        self.stale = []
        self.maps = []
        self.mem = None
