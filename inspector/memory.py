"""Guest memory as vqscope sees it: a table of regions, read only.

A region maps a range of guest-physical addresses (what descriptors carry) and
the same range in the front-end's virtual address space (what vhost-user's
SET_VRING_ADDR carries) onto a local buffer: an mmap of a memfd received with
SET_MEM_TABLE, a ``bytearray`` in tests, or a buffer gathered from
``/proc/PID/mem``. Every lookup is bounded: an access that starts outside
every region, or runs past the end of the region it starts in, raises
MemoryAccessError naming the address and size. Guest memory is hostile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import MemoryAccessError


@dataclass
class MemRegion:
    """One region: ``size`` bytes at guest-physical ``gpa`` and front-end
    virtual ``uva``, backed by ``buf`` (any object with the buffer protocol,
    at least ``size`` bytes long) starting at byte ``buf_offset``."""

    gpa: int
    size: int
    uva: int
    buf: Any
    buf_offset: int = 0

    def contains_gpa(self, addr: int) -> bool:
        return self.gpa <= addr < self.gpa + self.size

    def contains_uva(self, addr: int) -> bool:
        return self.uva <= addr < self.uva + self.size


@dataclass
class GuestMemory:
    """A region table. Regions do not overlap (the back-end validates that
    before adding them); lookups are linear, tables hold at most a few
    dozen regions (vhost-user's limit is 8, or 509 with CONFIGURE_MEM_SLOTS)."""

    regions: list[MemRegion] = field(default_factory=list)

    def add(self, gpa: int, buf: Any, *, uva: int | None = None, size: int | None = None,
            buf_offset: int = 0) -> MemRegion:
        """Add a region backed by ``buf``; ``uva`` defaults to ``gpa``."""
        if size is None:
            size = len(memoryview(buf).cast("B")) - buf_offset
        region = MemRegion(gpa=gpa, size=size, uva=gpa if uva is None else uva, buf=buf,
                           buf_offset=buf_offset)
        self.regions.append(region)
        return region

    def __iter__(self) -> Iterator[MemRegion]:
        return iter(self.regions)

    def region_for_gpa(self, addr: int, size: int = 1) -> MemRegion:
        """The region holding ``[addr, addr + size)``; raises MemoryAccessError."""
        for r in self.regions:
            if r.contains_gpa(addr):
                if addr + size > r.gpa + r.size:
                    raise MemoryAccessError(
                        f"guest-physical range {addr:#x}+{size:#x} runs past the end of "
                        f"region {r.gpa:#x}+{r.size:#x}")
                return r
        raise MemoryAccessError(f"guest-physical address {addr:#x} is outside every memory region")

    def uva_to_gpa(self, addr: int, size: int = 1) -> int:
        """Translate a front-end virtual address (vhost-user ring address) to
        guest-physical; the whole ``size`` bytes must lie in one region."""
        for r in self.regions:
            if r.contains_uva(addr):
                if addr + size > r.uva + r.size:
                    raise MemoryAccessError(
                        f"front-end address range {addr:#x}+{size:#x} runs past the end of "
                        f"region uva {r.uva:#x}+{r.size:#x}")
                return addr - r.uva + r.gpa
        raise MemoryAccessError(f"front-end address {addr:#x} is outside every memory region")

    def view(self, addr: int, size: int) -> memoryview:
        """A zero-copy view of ``size`` bytes at guest-physical ``addr``."""
        r = self.region_for_gpa(addr, size)
        off = r.buf_offset + addr - r.gpa
        return memoryview(r.buf).cast("B")[off:off + size]

    def read(self, addr: int, size: int) -> bytes:
        """Copy ``size`` bytes at guest-physical ``addr``."""
        return bytes(self.view(addr, size))
