"""Guest memory as vqscope sees it: a table of regions, read only.

A region maps a range of guest-physical addresses (what descriptors carry) and
the same range in the front-end's virtual address space (what vhost-user's
SET_VRING_ADDR carries) onto a local buffer: an mmap of a memfd received with
SET_MEM_TABLE, a ``bytearray`` in tests, or a buffer gathered from
``/proc/PID/mem``. Every lookup is bounded: an access that no region holds
entirely raises MemoryAccessError naming the address and size. Guest memory
is hostile.

A region may also be *validate-only* (``buf`` is None): guest memory that
exists but is not readable here, e.g. a QEMU's RAM of which only the ring
areas were gathered. Decoders accept buffer addresses inside it, but nothing
can be read from it. Readable regions take precedence: a read is served by
the first readable region holding the whole range, whatever validate-only
regions overlap it (see inspector.ring.reference for the decoders' rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import MemoryAccessError


@dataclass
class MemRegion:
    """One region: ``size`` bytes at guest-physical ``gpa`` and front-end
    virtual ``uva``, backed by ``buf`` (any object with the buffer protocol,
    at least ``size`` bytes long) starting at byte ``buf_offset``, or
    validate-only when ``buf`` is None."""

    gpa: int
    size: int
    uva: int
    buf: Any
    buf_offset: int = 0

    @property
    def readable(self) -> bool:
        return self.buf is not None

    def contains_gpa(self, addr: int) -> bool:
        return self.gpa <= addr < self.gpa + self.size

    def contains_uva(self, addr: int) -> bool:
        return self.uva <= addr < self.uva + self.size


@dataclass
class GuestMemory:
    """A region table. Readable regions do not overlap (the back-end
    validates that before adding them); validate-only regions may overlap
    readable ones. Lookups are linear, tables hold at most a few dozen
    regions (vhost-user's limit is 8, or 509 with CONFIGURE_MEM_SLOTS)."""

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

    def add_valid(self, gpa: int, size: int, *, uva: int | None = None) -> MemRegion:
        """Add a validate-only region: ``size`` bytes of guest memory at
        ``gpa`` that exist but are not readable here."""
        region = MemRegion(gpa=gpa, size=size, uva=gpa if uva is None else uva, buf=None)
        self.regions.append(region)
        return region

    def __iter__(self) -> Iterator[MemRegion]:
        return iter(self.regions)

    def region_for_gpa(self, addr: int, size: int = 1) -> MemRegion:
        """The first readable region holding all of ``[addr, addr + size)``;
        raises MemoryAccessError (saying whether the range runs past a
        region's end or lies in validate-only memory)."""
        holders = [r for r in self.regions if r.contains_gpa(addr)]
        whole = [r for r in holders if addr + size <= r.gpa + r.size]
        for r in whole:
            if r.buf is not None:
                return r
        if whole:
            raise MemoryAccessError(
                f"guest-physical range {addr:#x}+{size:#x} is guest memory that was not read "
                f"(validate-only region {whole[0].gpa:#x}+{whole[0].size:#x})")
        if holders:
            raise MemoryAccessError(
                f"guest-physical range {addr:#x}+{size:#x} runs past the end of "
                f"region {holders[0].gpa:#x}+{holders[0].size:#x}")
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


def iova_view(mem: GuestMemory, entries) -> GuestMemory:
    """Memory as a device behind an IOMMU sees it (VIRTIO_F_ACCESS_PLATFORM):
    one region per IOTLB entry ``(iova, size, uaddr, ...)`` at its IOVA
    (both ``gpa`` and ``uva``), backed by the part of ``mem`` that holds
    front-end addresses ``[uaddr, uaddr + size)``; neighbours contiguous in
    both spaces are joined. Entries not inside one region of ``mem`` are
    left out (those IOVAs then read as unmapped). Decoders given the view
    read IOVA-addressed rings and check descriptor addresses against the
    IOTLB instead of guest-physical memory."""
    view = GuestMemory()
    last = None
    for e in entries:
        iova, size, uaddr = e[0], e[1], e[2]
        src = next((r for r in mem.regions if r.buf is not None and r.contains_uva(uaddr)
                    and uaddr + size <= r.uva + r.size), None)
        if src is None:
            continue
        off = src.buf_offset + (uaddr - src.uva)
        if (last is not None and last.buf is src.buf and last.gpa + last.size == iova
                and last.buf_offset + last.size == off):
            last.size += size
            continue
        last = view.add(iova, src.buf, uva=iova, size=size, buf_offset=off)
    return view
