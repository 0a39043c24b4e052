"""QEMU's human monitor, parsed: the guest RAM of ``info mtree -f``'s flat
view, ``gpa2hva`` answers, and the process's ``/proc/PID/maps`` they are
checked against. Pure functions of text; nothing here talks to QEMU."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import SourceError

_FV_HEADER = re.compile(r"^FlatView #\d+", re.M)
_FV_AS = re.compile(r'^\s*AS "([^"]*)", root:', re.M)
_FV_RANGE = re.compile(
    r"^\s*([0-9a-fA-F]+)-([0-9a-fA-F]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-fA-F]+))?")


@dataclass(frozen=True)
class FlatRange:
    """One RAM line of a flat view: ``[gpa, gpa + size)`` is ``name`` from
    byte ``offset`` of that memory region."""

    gpa: int
    size: int
    name: str
    offset: int


#: IOMMU memory regions in ``info mtree`` (QEMU's names: hw/i386/intel_iommu.c
#: "vtd-BB.F-dmar", hw/virtio/virtio-iommu.c, hw/i386/amd_iommu.c,
#: hw/arm/smmuv3.c) and the model each means.
_IOMMU_REGIONS = (("-dmar", "intel-iommu"), ("virtio-iommu-memory-region", "virtio-iommu"),
                  ("amd_iommu", "amd-iommu"), ("smmuv3-", "arm-smmuv3"))


def iommu_model(mtree: str) -> str | None:
    """The vIOMMU model whose IOMMU memory regions ``info mtree`` (not
    ``-f``) shows, or None when the machine has none."""
    for line in mtree.splitlines():
        name = line.rpartition("): ")[2].split(" ", 1)[0]
        for marker, model in _IOMMU_REGIONS:
            if marker in name:
                return model
    return None


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The ``ram`` ranges of ``address_space``'s flat view in HMP ``info
    mtree -f`` output, e.g.::

        FlatView #1
         AS "memory", root: system
         AS "cpu-memory-0", root: system
         Root memory region: system
          0000000000000000-00000000000bffff (prio 0, ram): mem0
          00000000000c0000-00000000000c1fff (prio 0, rom): mem0 @00000000000c0000
          0000000000100000-000000003fffffff (prio 0, ram): mem0 @0000000000100000

    Raises SourceError when there is no such flat view."""
    starts = [m.start() for m in _FV_HEADER.finditer(text)] + [len(text)]
    for a, b in zip(starts, starts[1:]):
        view = text[a:b]
        if address_space not in _FV_AS.findall(view):
            continue
        out = []
        for line in view.splitlines():
            m = _FV_RANGE.match(line)
            if m and m.group(3) == "ram":
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                out.append(FlatRange(lo, hi - lo + 1, m.group(4), int(m.group(5) or "0", 16)))
        return out
    raise SourceError(f'no flat view of address space "{address_space}" in `info mtree -f` '
                      f"({len(text)} characters)")


_GPA2HVA = re.compile(r"Host virtual address for (0x[0-9a-fA-F]+) \(([^)]*)\) is (0x[0-9a-fA-F]+)")


def parse_gpa2hva(text: str, gpa: int) -> int:
    """The address in HMP ``gpa2hva`` output ("Host virtual address for
    0x100000 (mem0) is 0x7ff64c0ff000")."""
    m = _GPA2HVA.search(text)
    if not m or int(m.group(1), 16) != gpa:
        raise SourceError(f"HMP gpa2hva {gpa:#x} answered {text.strip()!r}")
    return int(m.group(3), 16)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """``/proc/PID/maps`` lines as :class:`Mapping` (sorted, as the kernel
    prints them)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def check_mapped(maps: list[Mapping], hva: int, size: int, what: str) -> None:
    """``[hva, hva + size)`` must lie in readable mappings without holes;
    raise SourceError naming ``what`` otherwise."""
    pos, end = hva, hva + size
    for m in maps:
        if m.end <= pos or m.start > pos:
            continue
        if "r" not in m.perms:
            raise SourceError(f"{what}: QEMU's mapping {m.start:#x}-{m.end:#x} ({m.path or 'anonymous'}) "
                              f"at {pos:#x} is not readable ({m.perms})")
        pos = m.end
        if pos >= end:
            return
    raise SourceError(f"{what}: QEMU virtual range {hva:#x}+{size:#x} is not mapped in the process "
                      f"at {pos:#x} (/proc/PID/maps); the memory map changed or gpa2hva lied")
