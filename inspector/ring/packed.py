"""Packed-ring positions and the result of both packed-ring decoders
(VIRTIO 1.2 §2.8).

Positions. A position in a packed ring is a slot (0..size-1) and a wrap
counter (0/1); the initial wrap counter is 1 at slot 0 and it toggles each
time the position passes the last slot (§2.8.1). A position maps to a
*counter* ``c = slot + size * (1 - wrap)`` mod ``2 * size``
(:func:`packed_counter`); counters advance by one per slot, and the distance
from one position to another is ``(c_to - c_from) mod 2 * size``
(:func:`packed_distance`), meaningful up to ``size``. This module is the
one place for that arithmetic.

Result. :func:`inspector.ring.decoder.snapshot_packed` (C) and
:func:`inspector.ring.reference_packed.snapshot_packed` (pure Python) return a
:class:`PackedRingSnapshot`, the packed twin of
:class:`~inspector.ring.snapshot.RingSnapshot`: header fields as ints,
descriptors and chains as columns (``desc_next`` holds each listed
descriptor's buffer ``id``; ``chain_head`` the chain's buffer id, from its
last descriptor, §2.8.6; ``chain_slot`` the slot of its first descriptor),
``ring_flags`` / ``ring_id`` the flags and id of every slot of the
descriptor ring as read, and the anomalies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .anomalies import Anomaly
from .snapshot import U16, U32, U64, Chain, ChainColumns

if TYPE_CHECKING:
    from .blk_request import BlkRequest

#: How a decoder found the device's positions (README "Snapshot JSON"):
#: given with their wrap counters; slots given, wrap counters derived from
#: the ring; nothing given, read from the descriptor flags alone.
POSITIONS = ("device", "derived", "flags")

#: Header fields (ints; ``last_avail_idx`` and ``last_avail_wrap_counter``
#: may be None, ``positions`` is one of POSITIONS).
PACKED_HEADER = ("size", "next_avail", "avail_wrap_counter", "next_used", "used_wrap_counter",
                 "last_avail_idx", "last_avail_wrap_counter", "driver_event_flags",
                 "driver_event_off", "driver_event_wrap", "device_event_flags", "device_event_off",
                 "device_event_wrap", "positions", "inflight")
#: Columns and their item formats.
PACKED_COLUMNS = {
    "ring_flags": U16,       # [size] flags of every descriptor-ring slot, as read
    "ring_id": U16,          # [size] id of every slot
    "desc_addr": U64,        # [n_descs] listed descriptors, chain after chain
    "desc_len": U32,
    "desc_flags": U16,
    "desc_next": U16,        # the descriptor's buffer id (struct pvirtq_desc.id)
    "chain_head": U32,       # [n_chains] buffer id of the chain (its last descriptor's id)
    "chain_slot": U32,       # slot of its first descriptor
    "chain_first": U32,      # index of its first listed descriptor in desc_*
    "chain_ndescs": U32,     # its number of listed descriptors
    "chain_out_bytes": U64,  # sum of len of device-readable descriptors
    "chain_in_bytes": U64,   # sum of len of device-writable descriptors
}


def packed_counter(slot: int, wrap: int, size: int) -> int:
    """The counter of position (``slot``, ``wrap``) in a ring of ``size``:
    ``slot + size * (1 - wrap)`` mod ``2 * size`` (0..2·size-1)."""
    return (slot + size * (1 - wrap)) % (2 * size)


def packed_distance(c_from: int, c_to: int, size: int) -> int:
    """Slots from counter ``c_from`` forward to counter ``c_to``:
    ``(c_to - c_from) mod 2 * size`` (0..2·size-1; a real distance between
    a ring's positions is at most ``size``)."""
    return (c_to - c_from) % (2 * size)


def packed_position(counter: int, size: int) -> tuple[int, int]:
    """``(slot, wrap)`` of ``counter`` (any int, taken mod 2·size): the
    inverse of :func:`packed_counter`."""
    c = counter % (2 * size)
    return c % size, 1 if c < size else 0


class PackedRingSnapshot(ChainColumns):
    """One packed ring as read by a decoder; see the module docstring.

    Chain ``k`` lists descriptors ``chain_first[k] .. chain_first[k] +
    chain_ndescs[k] - 1`` of the ``desc_*`` columns. Equality compares the
    header, every column's values and the anomalies, whatever the column
    types. ``inflight`` is the distance from (next_used, used_wrap_counter)
    to (next_avail, avail_wrap_counter).
    """

    layout = "packed"
    _DESC_KEY = "id"
    _SLOT_COLUMN = "chain_slot"

    __slots__ = PACKED_HEADER + tuple(PACKED_COLUMNS) + ("anomalies", "_chains", "requests")

    def __init__(self, *, size: int, next_avail: int, avail_wrap_counter: int, next_used: int,
                 used_wrap_counter: int, last_avail_idx: int | None,
                 last_avail_wrap_counter: int | None, driver_event_flags: int,
                 driver_event_off: int, driver_event_wrap: int, device_event_flags: int,
                 device_event_off: int, device_event_wrap: int, positions: str,
                 ring_flags, ring_id, desc_addr, desc_len, desc_flags, desc_next, chain_head,
                 chain_slot, chain_first, chain_ndescs, chain_out_bytes, chain_in_bytes,
                 anomalies: list[Anomaly]):
        self.size = size
        self.next_avail = next_avail
        self.avail_wrap_counter = avail_wrap_counter
        self.next_used = next_used
        self.used_wrap_counter = used_wrap_counter
        self.last_avail_idx = last_avail_idx
        self.last_avail_wrap_counter = last_avail_wrap_counter
        self.driver_event_flags = driver_event_flags
        self.driver_event_off = driver_event_off
        self.driver_event_wrap = driver_event_wrap
        self.device_event_flags = device_event_flags
        self.device_event_off = device_event_off
        self.device_event_wrap = device_event_wrap
        self.positions = positions
        self.inflight = packed_distance(packed_counter(next_used, used_wrap_counter, size),
                                        packed_counter(next_avail, avail_wrap_counter, size), size)
        self.ring_flags = ring_flags
        self.ring_id = ring_id
        self.desc_addr = desc_addr
        self.desc_len = desc_len
        self.desc_flags = desc_flags
        self.desc_next = desc_next
        self.chain_head = chain_head
        self.chain_slot = chain_slot
        self.chain_first = chain_first
        self.chain_ndescs = chain_ndescs
        self.chain_out_bytes = chain_out_bytes
        self.chain_in_bytes = chain_in_bytes
        self.anomalies = anomalies
        self._chains: list[Chain] | None = None
        self.requests: list[BlkRequest] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A plain-data view of everything the decoder read, for tests and
        the fuzz replay: header fields, ``ring_flags`` / ``ring_id`` (lists),
        ``chains`` (as :meth:`chain_dicts`) and ``anomalies`` (``{"kind",
        "detail", "head"}``; ``head`` is the first slot of the chain whose
        walk found it). New objects each call."""
        d: dict[str, Any] = {f: getattr(self, f) for f in PACKED_HEADER}
        d["ring_flags"] = self.ring_flags.tolist()
        d["ring_id"] = self.ring_id.tolist()
        d["chains"] = self.chain_dicts()
        d["anomalies"] = [{"kind": a.kind.value, "detail": a.detail, "head": a.head}
                          for a in self.anomalies]
        return d

    # --- comparison -----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedRingSnapshot):
            return NotImplemented
        return (all(getattr(self, f) == getattr(other, f) for f in PACKED_HEADER)
                and all(getattr(self, c).tolist() == getattr(other, c).tolist()
                        for c in PACKED_COLUMNS)
                and list(self.anomalies) == list(other.anomalies))

    __hash__ = None  # type: ignore[assignment]  # compared by value

    def __repr__(self) -> str:
        return (f"<PackedRingSnapshot size={self.size} next_avail={self.next_avail}/"
                f"{self.avail_wrap_counter} next_used={self.next_used}/{self.used_wrap_counter} "
                f"positions={self.positions} chains={self.n_chains} descs={self.n_descs} "
                f"anomalies={len(self.anomalies)}>")


__all__ = ["PACKED_COLUMNS", "PACKED_HEADER", "POSITIONS", "PackedRingSnapshot",
           "packed_counter", "packed_distance", "packed_position"]
