"""Driver side of a packed virtqueue (VIRTIO 1.2 §2.8), in Python.

The packed twin of :mod:`inspector.ring.driver`: the *driver's* half of a
packed ring. It owns the descriptor ring and the driver event suppression
area, reads the device's used descriptors and its event suppression area.
vqscope's built-in vhost-user front-end drives the back-end with it, and
tests build packed rings with it, hostile ones included
(:meth:`PackedDriverRing.add_hostile`, each kind of :data:`HOSTILE_PACKED`). It writes guest memory; nothing on
the inspector side ever does.

Memory (§2.8.10, §2.8.13), laid out from ``base`` as Linux allocates it
(inspector.layout.packed_layout): the
descriptor ring (``struct pvirtq_desc {le64 addr; le32 len; le16 id;
le16 flags}`` x size, 16-byte aligned), then the driver event suppression
area (``struct pvirtq_event_suppr {le16 desc; le16 flags}``: written by the
driver, controls the device's used buffer notifications, "calls"), then the
device event suppression area (written by the device, controls the driver's
available buffer notifications, "kicks"). vhost-user's SET_VRING_ADDR
carries them as desc, avail (driver area) and used (device area).

Ordering (§2.8.21, "Supplying Buffers to The Device"): a chain's descriptors
are written first, the head's ``flags`` (which make the chain available) last,
each with one 16-bit store; :meth:`PackedDriverRing.publish` writes the heads
of every chain added since the last publish, the first chain's head last, so
the device sees the batch at once (as a split ring's ``avail->idx``). Reads
of a used descriptor load its ``flags`` first, then ``id`` and ``len``.

All multi-byte fields are little-endian (VIRTIO 1.x).
"""

from __future__ import annotations

import struct
import sys
from typing import Sequence

from ..errors import InspectorError
from ..layout import packed_layout
from ..memory import GuestMemory
from .anomalies import AnomalyKind
from ..spec.virtio import (PVIRTQ_DESC_SIZE, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
                           RING_EVENT_FLAGS_ENABLE, RING_EVENT_OFF_MASK, RING_EVENT_WRAP_SHIFT,
                           VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                           VRING_DESC_F_WRITE)
from .driver import _load_u16, _store_u16
from .packed import packed_counter, packed_distance

_DESC = struct.Struct("<QIHH")        # addr, len, id, flags
_DESC_HEAD = struct.Struct("<QIH")    # addr, len, id: a head without its flags
_FLAGS_OFF = 14                       # offset of pvirtq_desc.flags
_SWAP = sys.byteorder != "little"

#: Ring violations :meth:`PackedDriverRing.add_hostile` writes, each named by
#: the decoders' anomaly kind it shows as, with the rule it breaks. The
#: back-end must break the queue on each; none needs a device that misbehaves.
HOSTILE_PACKED = {
    AnomalyKind.ID_OUT_OF_RANGE: "§2.8.6: the Buffer ID (in the chain's last descriptor) is below the queue size",
    AnomalyKind.CHAIN_TOO_LONG: "§2.8.6, §2.8.17: a chain is never longer than the queue (NEXT on every "
                                "descriptor)",
    AnomalyKind.AVAIL_USED_PATTERN: "§2.8.1, §2.8.21: every descriptor of an available chain has AVAIL = the "
                                    "Driver Ring Wrap Counter and USED its inverse",
    AnomalyKind.INDIRECT_WITH_NEXT: "§2.8.7: a driver MUST NOT set both INDIRECT and NEXT",
    AnomalyKind.NESTED_INDIRECT: "§2.8.7: a driver MUST NOT set INDIRECT within an indirect descriptor",
    AnomalyKind.INDIRECT_LEN: "§2.8.7: an indirect table's len is a non-zero multiple of 16",
    AnomalyKind.ADDR_OUT_OF_RANGE: "§2.8.4: a buffer lies in guest memory",
    AnomalyKind.INDIRECT_OUT_OF_RANGE: "§2.8.7: an indirect table lies in guest memory",
    AnomalyKind.ZERO_LEN: "a descriptor of length 0 (flagged, not forbidden)",
}


def _load_u32(view: memoryview, off: int) -> int:
    """Read a 32-bit field with ONE load: the device event suppression
    area's ``desc`` and ``flags`` together, never a torn pair (Linux
    virtqueue_kick_prepare_packed reads it as one u32 too)."""
    value = view[off:off + 4].cast("I")[0]
    if _SWAP:
        value = int.from_bytes(value.to_bytes(4, "little"), "big")
    return value


def avail_flags(wrap: int) -> int:
    """The AVAIL/USED bits of a descriptor the driver makes available while
    its Driver Ring Wrap Counter is ``wrap`` (§2.8.1): AVAIL = wrap, USED = !wrap."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def is_used(flags: int, used_wrap_counter: int) -> bool:
    """Does a descriptor with ``flags`` hold a used buffer for the driver's
    used wrap counter (§2.8.1: AVAIL == USED == the counter)?"""
    avail = bool(flags & VIRTQ_DESC_F_AVAIL)
    return avail == bool(flags & VIRTQ_DESC_F_USED) == bool(used_wrap_counter)


def event_word(off: int, wrap: int) -> int:
    """``struct pvirtq_event_suppr.desc`` for slot ``off`` and wrap ``wrap``
    (§2.8.13: desc_event_off:15, desc_event_wrap:1)."""
    return (off & RING_EVENT_OFF_MASK) | (wrap & 1) << RING_EVENT_WRAP_SHIFT


class PackedDriverRing:
    """A packed ring of ``size`` descriptors (1..32768, any size: §2.8
    needs no power of two) at guest-physical ``base`` in ``mem``; zeroed at
    creation (every descriptor then reads as neither available nor used for
    the initial wrap counters, 1: §2.8.1).

    Buffers are ``(addr, len, writable)`` triples of guest-physical ranges;
    ``writable`` buffers are device-writable (``VRING_DESC_F_WRITE``). Buffer
    IDs are 0..size-1, handed out lowest first and reused once returned.

    State, under the spec's names: ``next_avail`` / ``avail_wrap_counter``
    (where the next chain goes, Driver Ring Wrap Counter), ``next_used`` /
    ``used_wrap_counter`` (where the driver reads the next used descriptor),
    ``num_free`` (descriptor slots free), ``published`` (descriptors made
    visible so far, an ever-growing count: kick decisions use it).
    """

    def __init__(self, mem: GuestMemory, base: int, size: int):
        self.layout = packed_layout(size)   # LayoutError unless 1 <= size <= 32768
        if base % PVIRTQ_DESC_SIZE:
            raise InspectorError(f"packed ring base {base:#x} is not 16-byte aligned (§2.8.10.1)")
        self.mem = mem
        self.size = size
        self._drv_off = self.layout.driver_event_offset
        self._dev_off = self.layout.device_event_offset
        self.desc_addr = base
        self.driver_event_addr = base + self._drv_off
        self.device_event_addr = base + self._dev_off
        self._view = mem.view(base, self.layout.total_size)
        self._view[:] = bytes(self.layout.total_size)
        self.next_avail, self.avail_wrap_counter = 0, 1
        self.next_used, self.used_wrap_counter = 0, 1
        self.num_free = size
        self.published = 0
        self._published_at = (0, 1)                 # (slot, wrap) after the last published descriptor
        self._free_ids = list(range(size - 1, -1, -1))
        self._chains: dict[int, int] = {}           # buffer id -> descriptors it occupies
        self._pending: list[tuple[int, int]] = []   # heads not yet published: (slot, flags)
        self._pending_descs = 0

    # --- raw field access (no checks: tests use it to corrupt) --------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, id_: int, flags: int) -> None:
        """Write descriptor ``slot`` verbatim, flags last with one store."""
        _DESC_HEAD.pack_into(self._view, PVIRTQ_DESC_SIZE * slot, addr, length, id_)
        _store_u16(self._view, PVIRTQ_DESC_SIZE * slot + _FLAGS_OFF, flags)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """``(addr, len, id, flags)`` of descriptor ``slot``."""
        return _DESC.unpack_from(self._view, PVIRTQ_DESC_SIZE * slot)

    def desc_flags(self, slot: int) -> int:
        return _load_u16(self._view, PVIRTQ_DESC_SIZE * slot + _FLAGS_OFF)

    @property
    def avail_counter(self) -> int:
        """The driver's next position (next_avail, avail_wrap_counter) as a
        counter (inspector.ring.packed.packed_counter)."""
        return packed_counter(self.next_avail, self.avail_wrap_counter, self.size)

    @property
    def used_counter(self) -> int:
        """The driver's next used position as a counter."""
        return packed_counter(self.next_used, self.used_wrap_counter, self.size)

    # --- event suppression (§2.8.10) -----------------------------------------------------------------
    def set_driver_event(self, flags: int, off: int | None = None, wrap: int | None = None) -> None:
        """Write the driver event suppression area: ``off``/``wrap`` first
        (when given), then ``flags`` (ENABLE, DISABLE or DESC; DESC only with
        VIRTIO_RING_F_EVENT_IDX), as Linux virtqueue_enable_cb_prepare_packed."""
        if off is not None:
            _store_u16(self._view, self._drv_off, event_word(off, wrap or 0))
        _store_u16(self._view, self._drv_off + 2, flags)

    def enable_calls(self, event_idx: bool) -> None:
        """Ask for a used buffer notification: with EVENT_IDX at the next
        used descriptor the driver will read (DESC at next_used /
        used_wrap_counter), else at every one (ENABLE)."""
        if event_idx:
            self.set_driver_event(RING_EVENT_FLAGS_DESC, self.next_used, self.used_wrap_counter)
        else:
            self.set_driver_event(RING_EVENT_FLAGS_ENABLE)

    def disable_calls(self) -> None:
        self.set_driver_event(RING_EVENT_FLAGS_DISABLE)

    @staticmethod
    def _event(word: int) -> tuple[int, int, int]:
        return (word >> 16) & 0x3, word & RING_EVENT_OFF_MASK, (word >> RING_EVENT_WRAP_SHIFT) & 1

    @property
    def driver_event(self) -> tuple[int, int, int]:
        """``(flags, off, wrap)`` of the driver event suppression area."""
        return self._event(_load_u32(self._view, self._drv_off))

    @property
    def device_event(self) -> tuple[int, int, int]:
        """``(flags, off, wrap)`` of the device event suppression area, read
        with one load."""
        return self._event(_load_u32(self._view, self._dev_off))

    def need_kick(self, since: int, event_idx: bool) -> bool:
        """Does the device want an available buffer notification for what
        was published after ``since`` (a value of :attr:`published`)?
        (§2.8.10, Linux virtqueue_kick_prepare_packed): DISABLE: no; DESC
        (only honoured with ``event_idx``): iff the descriptor at the
        device's off/wrap was published in that window; otherwise (ENABLE,
        or a value the spec does not define): yes. A device event position
        off >= size, or a window of more than ``size`` descriptors, kicks."""
        flags, off, wrap = self.device_event
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not event_idx:
            return True
        added = self.published - since
        if off >= self.size or added > self.size:
            return True
        new = packed_counter(*self._published_at, self.size)
        old = (new - added) % (2 * self.size)
        return packed_distance(old, packed_counter(off, wrap, self.size), self.size) < added

    # --- making buffers available (§2.8.21) --------------------------------------------------------
    def _take_id(self, buffer_id: int | None) -> int:
        if buffer_id is not None:
            if buffer_id in self._free_ids:
                self._free_ids.remove(buffer_id)
            return buffer_id
        if not self._free_ids:
            raise InspectorError(f"no free buffer id: {self.size} chains in flight")
        return self._free_ids.pop()

    def add_descs(self, descs: Sequence[tuple[int, int, int]], buffer_id: int | None = None, *,
                  id_in_all: bool = True, wrap_bits: Sequence[int | None] | None = None) -> int:
        """Write ``descs`` (``(addr, len, flags)``, flags without AVAIL/USED)
        at consecutive slots from ``next_avail`` as one chain (not yet
        published: :meth:`publish`) and return its buffer id. NEXT is the
        caller's (every descriptor but the last, for a well-formed chain).
        The id goes in the last descriptor (§2.8.6), and in every one with
        ``id_in_all`` (as Linux). ``buffer_id``: a given id (hostile writers
        use ids >= size), else the lowest free. ``wrap_bits``: per
        descriptor, None for the right AVAIL/USED bits for its slot's wrap
        (a chain crossing the ring's end toggles them), else those bits
        verbatim. InspectorError when fewer than ``len(descs)`` slots are free."""
        n = len(descs)
        if not 1 <= n <= self.num_free:
            raise InspectorError(f"cannot add a chain of {n} descriptors: {self.num_free} free of {self.size}")
        bid = self._take_id(buffer_id)
        slot, wrap = self.next_avail, self.avail_wrap_counter
        head = None
        for i, (addr, length, flags) in enumerate(descs):
            bits = wrap_bits[i] if wrap_bits is not None and wrap_bits[i] is not None else avail_flags(wrap)
            flags = (flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | bits
            id_ = bid if id_in_all or i == n - 1 else 0
            if i == 0:
                _DESC_HEAD.pack_into(self._view, PVIRTQ_DESC_SIZE * slot, addr, length, id_ & 0xFFFF)
                head = (slot, flags)
            else:
                _DESC.pack_into(self._view, PVIRTQ_DESC_SIZE * slot, addr, length, id_ & 0xFFFF, flags)
            slot += 1
            if slot == self.size:
                slot, wrap = 0, wrap ^ 1
        self.next_avail, self.avail_wrap_counter = slot, wrap
        self.num_free -= n
        self._chains[bid] = n
        self._pending.append(head)
        self._pending_descs += n
        return bid

    def add_chain(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Put a chain of ``buffers`` on the ring (not yet published);
        returns its buffer id. InspectorError when too few slots are free."""
        last = len(buffers) - 1
        return self.add_descs([(addr, length, (VRING_DESC_F_WRITE if writable else 0)
                                | (VRING_DESC_F_NEXT if i < last else 0))
                               for i, (addr, length, writable) in enumerate(buffers)])

    def write_table(self, table_addr: int, entries: Sequence[tuple[int, int, int]]) -> None:
        """Write an indirect table of ``entries`` (``(addr, len, flags)``) at
        guest-physical ``table_addr``; ids are 0 (reserved, §2.8.7)."""
        table = self.mem.view(table_addr, PVIRTQ_DESC_SIZE * len(entries))
        for i, (addr, length, flags) in enumerate(entries):
            _DESC.pack_into(table, PVIRTQ_DESC_SIZE * i, addr, length, 0, flags)

    def add_indirect_chain(self, table_addr: int, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Write an indirect table of ``buffers`` at ``table_addr`` (entries
        in order, no NEXT: §2.8.7; WRITE is the only flag) and put one
        ``VRING_DESC_F_INDIRECT`` descriptor on the ring pointing to it;
        returns its buffer id (not yet published)."""
        self.write_table(table_addr, [(a, ln, VRING_DESC_F_WRITE if w else 0) for a, ln, w in buffers])
        return self.add_descs([(table_addr, PVIRTQ_DESC_SIZE * len(buffers), VRING_DESC_F_INDIRECT)])

    def publish(self) -> int:
        """Make every chain added since the last publish available: write
        their heads' flags, the first chain's last (§2.8.21). Returns how
        many descriptors became visible."""
        for slot, flags in reversed(self._pending):
            _store_u16(self._view, PVIRTQ_DESC_SIZE * slot + _FLAGS_OFF, flags)
        n = self._pending_descs
        self.published += n
        self._published_at = (self.next_avail, self.avail_wrap_counter)
        self._pending, self._pending_descs = [], 0
        return n

    # --- used descriptors (§2.8.22) -----------------------------------------------------------------
    def has_used(self) -> bool:
        """Does the slot at next_used hold a used descriptor?"""
        return is_used(self.desc_flags(self.next_used), self.used_wrap_counter)

    def chain_len(self, buffer_id: int) -> int | None:
        """Descriptors the in-flight chain ``buffer_id`` occupies, or None."""
        return self._chains.get(buffer_id)

    def get_used(self) -> list[tuple[int, int]]:
        """Collect the used descriptors the device wrote since the last
        call, as ``(buffer id, len)``; frees their ids and slots and moves
        next_used past each chain's descriptors (the device writes one used
        descriptor per chain and skips the rest: §2.8.6), toggling
        used_wrap_counter at the ring's end. At most ``size`` per call.
        InspectorError for an id not in flight (a device that made it up or
        returned it twice)."""
        out = []
        for _ in range(self.size):
            slot = self.next_used
            if not is_used(self.desc_flags(slot), self.used_wrap_counter):
                break
            _, length, bid, _ = self.read_desc(slot)
            n = self._chains.pop(bid, None)
            if n is None:
                raise InspectorError(f"device returned buffer id {bid} at slot {slot} "
                                     f"(used wrap counter {self.used_wrap_counter}), which is not in flight")
            if bid < self.size:
                self._free_ids.append(bid)
            self.num_free += n
            self.next_used, self.used_wrap_counter = self._advance(slot, self.used_wrap_counter, n)
            out.append((bid, length))
        return out

    def _advance(self, slot: int, wrap: int, n: int) -> tuple[int, int]:
        slot += n
        while slot >= self.size:
            slot, wrap = slot - self.size, wrap ^ 1
        return slot, wrap

    def device_used_position(self) -> tuple[int, int]:
        """Where the device will write its next used descriptor, as the ring
        in memory shows it: next_used / used_wrap_counter moved past the used
        descriptors written and not yet collected (each skipping its chain's
        descriptors), without collecting them. A reconnecting front-end sends
        this as the base of a packed vring (the device's last_avail and
        used positions, nothing being in flight), as QEMU's split rings send
        ``used->idx``."""
        slot, wrap = self.next_used, self.used_wrap_counter
        for _ in range(self.size):
            if not is_used(self.desc_flags(slot), wrap):
                break
            n = self._chains.get(self.read_desc(slot)[2])
            if n is None:
                break
            slot, wrap = self._advance(slot, wrap, n)
        return slot, wrap

    # --- hostile rings ------------------------------------------------------------------------------
    def add_hostile(self, kind: AnomalyKind, buf: tuple[int, int, bool], *, table_addr: int,
                    mem_end: int) -> int:
        """Write one ring violation of ``kind`` (a key of HOSTILE_PACKED) as
        the next chain (not yet published) and return its buffer id. ``buf``
        is a valid ``(addr, len, writable)`` buffer of at least 32 bytes to
        use, ``table_addr`` a free guest-physical place for a 2-entry indirect
        table, ``mem_end`` the first guest-physical address past guest memory.
        ``chain_too_long`` needs every slot free."""
        if kind not in HOSTILE_PACKED:
            raise InspectorError(f"no hostile packed ring shows as {kind!r}: use one of "
                                 f"{sorted(k.value for k in HOSTILE_PACKED)}")
        addr, length, writable = buf
        w = VRING_DESC_F_WRITE if writable else 0
        half = length // 2
        two = [(addr, half, w | VRING_DESC_F_NEXT), (addr + half, length - half, w)]
        if kind is AnomalyKind.ID_OUT_OF_RANGE:
            return self.add_descs([(addr, length, w)], buffer_id=self.size)
        if kind is AnomalyKind.CHAIN_TOO_LONG:
            if self.num_free != self.size:
                raise InspectorError(f"a chain longer than the ring needs an idle ring: {self.num_free} of "
                                     f"{self.size} slots free")
            return self.add_descs([(addr, length, w | VRING_DESC_F_NEXT)] * self.size)
        if kind is AnomalyKind.AVAIL_USED_PATTERN:
            # The second descriptor carries the bits of the other lap: AVAIL=!w, USED=w.
            return self.add_descs(two, wrap_bits=[None, avail_flags(self.avail_wrap_counter ^ 1)])
        if kind is AnomalyKind.ZERO_LEN:
            return self.add_descs([two[0], (addr + half, 0, w)])
        if kind is AnomalyKind.ADDR_OUT_OF_RANGE:
            return self.add_descs([(mem_end + 0x1000, length, w)])
        if kind is AnomalyKind.INDIRECT_OUT_OF_RANGE:
            return self.add_descs([(mem_end + 0x1000, 2 * PVIRTQ_DESC_SIZE, VRING_DESC_F_INDIRECT)])
        entries = [(addr, half, w), (addr + half, length - half, w)]
        if kind is AnomalyKind.NESTED_INDIRECT:
            entries[1] = (table_addr, 2 * PVIRTQ_DESC_SIZE, VRING_DESC_F_INDIRECT)
        self.write_table(table_addr, entries)
        if kind is AnomalyKind.INDIRECT_WITH_NEXT:
            return self.add_descs([(table_addr, 2 * PVIRTQ_DESC_SIZE, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT),
                                   (addr, half, w)])
        if kind is AnomalyKind.INDIRECT_LEN:
            return self.add_descs([(table_addr, PVIRTQ_DESC_SIZE + 8, VRING_DESC_F_INDIRECT)])
        return self.add_descs([(table_addr, 2 * PVIRTQ_DESC_SIZE, VRING_DESC_F_INDIRECT)])
