"""Virtqueue memory layouts: split (VIRTIO 1.2 §2.7, legacy alignment
§2.7.2) and packed (§2.8, :func:`packed_layout`).

Offsets are bytes from the start of the descriptor table for the legacy
contiguous layout: descriptor table, then driver area (avail ring), then,
aligned to ``align``, the device area (used ring).

- descriptor table: 16 * N bytes (``struct virtq_desc``)
- driver area: 6 + 2 * N bytes: flags, idx, ring[N], ``used_event``
- device area: 6 + 8 * N bytes: flags, idx, ring[N] (id, len), ``avail_event``

QEMU's ``virtio_queue_update_rings`` (up to at least 7.2) aligns the used ring
after ``offsetof(VRingAvail, ring[num])``, i.e. without ``used_event``; where
that lands elsewhere (align <= 4, or tiny queues) ``mismatch`` is true.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import LayoutError
from .spec.vhost import INFLIGHT_ALIGNMENT, INFLIGHT_DESC_SIZE
from .spec.virtio import PVIRTQ_DESC_SIZE, PVIRTQ_EVENT_SUPPR_SIZE, VIRTQ_MAX_SIZE

DESC_SIZE = 16
AVAIL_HEADER = 4  # flags, idx
USED_HEADER = 4
USED_ELEM_SIZE = 8


def _align_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_queue_size(size: int) -> None:
    """Raise LayoutError unless 1 <= size <= 32768 and a power of two (§2.7)."""
    if not is_power_of_two(size) or size > VIRTQ_MAX_SIZE:
        raise LayoutError(
            f"queue size {size} is invalid: a split virtqueue's size must be a "
            f"power of two between 1 and {VIRTQ_MAX_SIZE} (VIRTIO 1.2 §2.7)"
        )


def check_packed_queue_size(size: int) -> None:
    """Raise LayoutError unless ``size`` is an integer in 1..32768: a packed
    ring's size need not be a power of two (VIRTIO 1.2 §2.8, §4.1.4.3.2)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= VIRTQ_MAX_SIZE:
        raise LayoutError(
            f"queue size {size!r} is invalid: a packed virtqueue's size must be an integer "
            f"between 1 and {VIRTQ_MAX_SIZE} (VIRTIO 1.2 §2.8)")


@dataclass(frozen=True)
class PackedLayout:
    """The three areas of a packed ring (VIRTIO 1.2 §2.8.10, §2.8.13), in
    bytes: the descriptor ring (``struct pvirtq_desc`` × size), the driver
    event suppression area (written by the driver: used buffer
    notifications) and the device event suppression area (written by the
    device: available buffer notifications), ``struct pvirtq_event_suppr``
    each. The areas are placed independently (§2.8.10.1 alignments 16, 4,
    4); the offsets below are one contiguous arrangement."""

    size: int
    desc_size: int
    driver_event_offset: int
    driver_event_size: int
    device_event_offset: int
    device_event_size: int
    total_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def packed_layout(size: int) -> PackedLayout:
    """The packed-ring layout of ``size`` descriptors (any integer
    1..32768; LayoutError otherwise): descriptor ring 16·size bytes, then
    the driver and the device event suppression areas, 4 bytes each."""
    check_packed_queue_size(size)
    desc = PVIRTQ_DESC_SIZE * size
    return PackedLayout(size=size, desc_size=desc,
                        driver_event_offset=desc, driver_event_size=PVIRTQ_EVENT_SUPPR_SIZE,
                        device_event_offset=desc + PVIRTQ_EVENT_SUPPR_SIZE,
                        device_event_size=PVIRTQ_EVENT_SUPPR_SIZE,
                        total_size=desc + 2 * PVIRTQ_EVENT_SUPPR_SIZE)


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Driver area bytes including ``used_event``."""
    return AVAIL_HEADER + 2 * size + 2


def used_ring_size(size: int) -> int:
    """Device area bytes including ``avail_event``."""
    return USED_HEADER + USED_ELEM_SIZE * size + 2


@dataclass(frozen=True)
class SplitLayout:
    """Where the three areas of a legacy contiguous split ring lie (bytes)."""

    size: int
    align: int
    desc_offset: int
    avail_offset: int
    used_offset: int
    total_size: int
    qemu_legacy_used_offset: int
    mismatch: bool

    def as_dict(self) -> dict:
        return asdict(self)


def split_layout(size: int, align: int) -> SplitLayout:
    """Compute the legacy layout of a split ring of ``size`` entries.

    Raises LayoutError for a size that is 0, not a power of two or > 32768,
    and for an align that is not a power of two.
    """
    check_queue_size(size)
    if not is_power_of_two(align):
        raise LayoutError(f"align {align} is invalid: it must be a power of two (VIRTIO 1.2 §2.7.2)")
    avail_offset = desc_table_size(size)
    used_offset = _align_up(avail_offset + avail_ring_size(size), align)
    qemu_used = _align_up(avail_offset + AVAIL_HEADER + 2 * size, align)
    return SplitLayout(
        size=size,
        align=align,
        desc_offset=0,
        avail_offset=avail_offset,
        used_offset=used_offset,
        total_size=used_offset + used_ring_size(size),
        qemu_legacy_used_offset=qemu_used,
        mismatch=qemu_used != used_offset,
    )


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's inflight area (vhost-user "Inflight I/O
    tracking", split-ring layout) for a ring of ``queue_size``: libvhost-user's
    vu_inflight_queue_size, 16 bytes per descriptor state plus the 2 it
    counts for the header, rounded up to INFLIGHT_ALIGNMENT (64), which
    makes room for the whole 16-byte header with any power-of-two size."""
    n = INFLIGHT_DESC_SIZE * queue_size + 2
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT
