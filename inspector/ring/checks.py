"""What the ring decoders (:mod:`.decoder`, :mod:`.reference`,
:mod:`.reference_packed`) and the remote reader (:mod:`.remote`) share:
argument checks done before a walk (split and packed), the region tables
the walks search, the error for a ring area outside memory, and 16-bit ring
index arithmetic."""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentError, RingError
from ..layout import (avail_ring_size, check_packed_queue_size, check_queue_size, desc_table_size,
                      packed_layout, used_ring_size)
from ..memory import GuestMemory

#: Default bound on the descriptors one snapshot lists (all chains together).
DEFAULT_MAX_DESCS = 1 << 17
U64_END = 1 << 64

#: The three areas of a split ring, in the order of desc, avail, used arguments.
AREAS = ("descriptor table", "driver area (avail ring)", "device area (used ring)")
#: The three areas of a packed ring, in the order of desc, driver_event, device_event.
PACKED_AREAS = ("descriptor ring", "driver area (driver event suppression)",
                "device area (device event suppression)")


def area_error(area_index: int, addr: int, length: int, names: tuple[str, ...] = AREAS) -> RingError:
    """The RingError for a ring area not inside one memory region (shared by
    both implementations so that their messages are equal); ``names``:
    AREAS (split) or PACKED_AREAS."""
    return RingError(
        f"{names[area_index]} at guest-physical 0x{addr:x} (+0x{length:x} bytes) is not "
        f"inside one memory region: check the queue addresses and the memory table")


def ring_between(lo: int, x: int, hi: int) -> bool:
    """``lo <= x <= hi`` for free-running 16-bit ring indices (e.g. a
    device's ``used_idx <= last_avail_idx <= avail_idx``)."""
    return (x - lo) & 0xFFFF <= (hi - lo) & 0xFFFF


def area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, driver area and device area (§2.7)."""
    return desc_table_size(size), avail_ring_size(size), used_ring_size(size)


def packed_area_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor ring and the driver and device event
    suppression areas (§2.8.10, §2.8.13)."""
    lay = packed_layout(size)
    return lay.desc_size, lay.driver_event_size, lay.device_event_size


def check_packed_args(size: int, desc: int, driver_event: int, device_event: int,
                      next_used: int | None, used_wrap_counter: int | None,
                      last_avail_idx: int | None, last_avail_wrap_counter: int | None,
                      max_descs: int) -> None:
    """Checks done in Python before either packed decoder runs: LayoutError
    for the size, RingError for a position out of range or an area address
    outside 64 bits, ArgumentError for a combination of positions the
    decoders do not take (a wrap counter without its slot; last_avail_idx
    without next_used; with ``used_wrap_counter`` given, last_avail_idx
    without its wrap counter; a last_avail wrap counter without
    ``used_wrap_counter``) or a bad max_descs."""
    check_packed_queue_size(size)
    for name, v in (("next_used", next_used), ("last_avail_idx", last_avail_idx)):
        if v is not None and not 0 <= v < size:
            raise RingError(f"{name} {v} is not a slot of a packed ring of size {size} "
                            f"(0..{size - 1}): pass the device's value or None")
    for name, v in (("used_wrap_counter", used_wrap_counter),
                    ("last_avail_wrap_counter", last_avail_wrap_counter)):
        if v is not None and v not in (0, 1):
            raise RingError(f"{name} {v} is not a wrap counter (0 or 1, VIRTIO 1.2 §2.8.1)")
    if used_wrap_counter is not None and next_used is None:
        raise ArgumentError("used_wrap_counter given without next_used")
    if last_avail_idx is not None and next_used is None:
        raise ArgumentError("last_avail_idx given without next_used")
    if last_avail_wrap_counter is not None and (last_avail_idx is None or used_wrap_counter is None):
        raise ArgumentError("last_avail_wrap_counter needs last_avail_idx and used_wrap_counter")
    if used_wrap_counter is not None and last_avail_idx is not None and last_avail_wrap_counter is None:
        raise ArgumentError("with used_wrap_counter given, last_avail_idx needs its wrap counter")
    if not 0 <= max_descs < 1 << 31:
        raise ArgumentError(f"max_descs {max_descs} must be in 0..2**31-1")
    for i, (addr, length) in enumerate(zip((desc, driver_event, device_event), packed_area_sizes(size))):
        if not 0 <= addr < U64_END:
            raise area_error(i, addr, length, PACKED_AREAS)


def check_args(size: int, desc: int, avail: int, used: int, last_avail_idx: int | None,
               max_descs: int) -> None:
    """Checks done in Python before either decoder runs (same for both)."""
    check_queue_size(size)
    if last_avail_idx is not None and not 0 <= last_avail_idx <= 0xFFFF:
        raise RingError(f"last_avail_idx {last_avail_idx} is not a 16-bit ring index "
                        f"(0..65535): pass the device's value or None")
    if not 0 <= max_descs < 1 << 31:
        raise ArgumentError(f"max_descs {max_descs} must be in 0..2**31-1")
    for i, (addr, length) in enumerate(zip((desc, avail, used), area_sizes(size))):
        if not 0 <= addr < U64_END:
            raise area_error(i, addr, length)


def region_table(mem: GuestMemory) -> list[tuple[int, int, Any, int]]:
    """``(gpa, size, buffer, buf_offset)`` per readable region, clamped so
    that no lookup can reach past the backing buffer or past 2**64: a region
    whose ``buf`` is shorter than ``size`` is shortened, one with an address
    that does not fit in 64 bits is dropped. Both decoders use this table."""
    out = []
    nbytes_of: dict[int, int] = {}  # id(buf) -> bytes (remote reads share one buffer)
    for r in mem.regions:
        if r.buf is None or not 0 <= r.gpa < U64_END or r.buf_offset < 0:
            continue
        nbytes = nbytes_of.get(id(r.buf))
        if nbytes is None:
            nbytes = nbytes_of[id(r.buf)] = memoryview(r.buf).nbytes
        size = max(0, min(r.size, nbytes - r.buf_offset, U64_END - r.gpa))
        out.append((r.gpa, size, r.buf, r.buf_offset))
    return out


def valid_table(mem: GuestMemory) -> list[tuple[int, int]]:
    """``(gpa, size)`` per validate-only region (``buf`` is None), clamped
    at 2**64; one whose address does not fit in 64 bits is dropped. Both
    decoders use this table."""
    return [(r.gpa, max(0, min(r.size, U64_END - r.gpa))) for r in mem.regions
            if r.buf is None and 0 <= r.gpa < U64_END]


