"""Pure-Python reference of the packed-ring snapshot decoder (VIRTIO 1.2 §2.8).

:func:`snapshot_packed` here and in :mod:`inspector.ring.decoder` (C,
csrc/vqd_decode_packed.c) return equal
:class:`~inspector.ring.packed.PackedRingSnapshot` objects for the same
memory; tests/unit/test_packed_decoder_diff.py holds them equal. This
module mirrors the C step by step, in the same order, with the same detail
strings: change both together. Region tables, the descriptor budget, buffer
and indirect-table checks are the split decoder's (:mod:`.reference`,
csrc/vqd_decode_walk.c): readable vs validate-only regions, an indirect
table in validate-only memory is ``indirect_not_read`` and returned by
:func:`snapshot_packed_pass` for the caller to read (:mod:`.remote`).

Terms. A descriptor at counter ``c`` (:mod:`inspector.ring.packed`) has the
wrap counter ``w`` of its round. It is *available* when its AVAIL bit is
``w`` and its USED bit is not (§2.8.1), *used* when both are ``w`` (§2.8.9).
Every write to a slot, the driver's (a descriptor made available) or the
device's (a used descriptor), sets AVAIL to the round's wrap counter.

Where the walk starts: the device's positions (``positions`` in the result).

- ``"device"``: the caller gives ``next_used`` with ``used_wrap_counter``
  (and ``last_avail_idx`` with ``last_avail_wrap_counter``, or neither):
  our back-end, which keeps them.
- ``"derived"``: slots without wrap counters (QEMU's ``used-idx`` and
  ``last-avail-idx`` are bare 15-bit slots). Each counter is derived from
  the AVAIL bit of the slot just before the position: every slot before a
  position in the position's round was written in that round (by the driver;
  the device's used write keeps AVAIL = the round), so for slot ``s > 0``
  the counter is AVAIL of slot ``s - 1``; for slot 0 the slot before is the
  ring's last, written one round earlier, so the counter is NOT its AVAIL
  bit. One exception: when every descriptor is outstanding the driver has
  already rewritten the slot before ``next_used`` in the next round, and the
  derived counter is the wrong one. That ring is detected (with the other
  counter, every one of the ``size`` slots from ``next_used`` is available)
  and the other counter taken. ``last_avail_idx`` derives the same way; on
  such a full ring, if it is the same slot as ``next_used`` the device is
  taken to have taken nothing (last_avail = next_used): the flags cannot
  tell that from "took everything", which a device that pops and
  completes at once (QEMU) is not caught in.
- ``"flags"``: nothing given. The driver's position is the step in the
  AVAIL bits (slots ``[0, next_avail)`` carry the current round's AVAIL bit,
  the rest the previous round's; all equal: next_avail is 0 in the round
  after theirs). ``next_used`` is *estimated* as the slot after the last used
  descriptor before that position (none within ``size`` slots: every slot in
  flight). Buffers completed out of order and the descriptors the device
  skipped after a used one (§2.8.9: one used descriptor per chain) look
  available: from the flags alone they are listed as chains.

A ``last_avail`` position more than ``size`` slots ahead of ``next_used``
is not a position of this ring: it is not used (``last_avail_idx`` None in
the result).

Checks before the walk (``device`` and ``derived``): a used descriptor
(AVAIL == USED == its round) at ``next_used`` or between it and
``last_avail`` — where the driver's buffers are outstanding and the device
writes nothing until it returns one at ``next_used`` — is
``used_not_available`` (no chain; also what positions older than the ring
read look like: :mod:`.remote` decodes those again from the flags).

The walk: from ``last_avail`` when known, else ``next_used``, while the
descriptor at the position is available, at most ``size`` minus the slots
from ``next_used`` to the start. A chain is consecutive slots joined by
``VRING_DESC_F_NEXT`` (the counter, and the wrap, advance by one per slot);
its buffer id is its last descriptor's (§2.8.6), ``id_out_of_range`` when
``>= size``. A ``VRING_DESC_F_INDIRECT`` descriptor is the chain's only one
(with NEXT too: ``indirect_with_next``, and NEXT is not followed); its table
(§2.8.7: len / 16 descriptors, used in order, no next) is listed instead
(``indirect_len``, ``nested_indirect``, ``indirect_out_of_range``,
``indirect_not_read`` as in the split decoder). A NEXT on the last slot the
walk may take is ``chain_too_long``; a NEXT followed by a slot that is not
available is ``avail_used_pattern`` and ends the walk. The walk stops at the
first slot that is not available: that is ``next_avail`` /
``avail_wrap_counter``. ``inflight`` is the distance from ``next_used`` to
``next_avail``. Descriptors past the ``max_descs`` budget are walked (the
positions need them) but not listed (one ``truncated``).

After the walk: every slot the driver wrote before ``next_avail`` (the
``size - 1`` slots before it) must carry the AVAIL bit of its round; the
first that does not is one ``avail_used_pattern`` (no chain). Slots right
after ``next_avail`` that are available for the round being written are
allowed: the driver writes a chain's head (at next_avail) last (§2.8.21.1).

An anomaly's ``head`` is the first slot of the chain whose walk found it,
None for those found outside a chain's walk.
"""

from __future__ import annotations

import struct
from array import array

from ..memory import GuestMemory
from ..spec.virtio import (RING_EVENT_OFF_MASK, RING_EVENT_WRAP_SHIFT, VIRTQ_DESC_F_AVAIL,
                           VIRTQ_DESC_F_USED, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT)
from .anomalies import AnomalyKind as K
from .checks import (DEFAULT_MAX_DESCS, PACKED_AREAS, area_error, check_packed_args,
                     packed_area_sizes, region_table, valid_table)
from .packed import PackedRingSnapshot, packed_counter, packed_distance, packed_position
from .reference import _Mem, _Walk
from .snapshot import U16, U32, U64

_PDESC = struct.Struct("<QIHH")  # struct pvirtq_desc: addr, len, id, flags (§2.8.13)
_EVENT = struct.Struct("<HH")    # struct pvirtq_event_suppr: desc, flags (§2.8.10)


class _Ring:
    """The flags copy and the counter tests over it (C: struct pwalk)."""

    def __init__(self, flags: array, size: int):
        self.flags = flags
        self.size = size

    def a(self, slot: int) -> int:
        return 1 if self.flags[slot] & VIRTQ_DESC_F_AVAIL else 0

    def u(self, slot: int) -> int:
        return 1 if self.flags[slot] & VIRTQ_DESC_F_USED else 0

    def avail_at(self, c: int) -> bool:
        slot, w = packed_position(c, self.size)
        return self.a(slot) == w and self.u(slot) != w

    def used_at(self, c: int) -> bool:
        slot, w = packed_position(c, self.size)
        return self.a(slot) == w and self.u(slot) == w

    def derive(self, slot: int) -> int:
        """The wrap counter of a bare slot (module docstring, "derived")."""
        return self.a(slot - 1) if slot > 0 else 1 - self.a(self.size - 1)


def snapshot_packed(mem: GuestMemory, size: int, desc: int, driver_event: int, device_event: int,
                    *, next_used: int | None = None, used_wrap_counter: int | None = None,
                    last_avail_idx: int | None = None, last_avail_wrap_counter: int | None = None,
                    max_descs: int = DEFAULT_MAX_DESCS) -> PackedRingSnapshot:
    """Snapshot a packed ring (pure Python); see the module docstring.
    Raises LayoutError (size), RingError (an area not inside one readable
    region, a position out of range), ArgumentError (positions combined in a
    way :func:`~inspector.ring.checks.check_packed_args` refuses)."""
    return snapshot_packed_pass(mem, size, desc, driver_event, device_event, next_used=next_used,
                                used_wrap_counter=used_wrap_counter, last_avail_idx=last_avail_idx,
                                last_avail_wrap_counter=last_avail_wrap_counter,
                                max_descs=max_descs)[0]


def snapshot_packed_pass(mem: GuestMemory, size: int, desc: int, driver_event: int,
                         device_event: int, *, next_used: int | None = None,
                         used_wrap_counter: int | None = None, last_avail_idx: int | None = None,
                         last_avail_wrap_counter: int | None = None,
                         max_descs: int = DEFAULT_MAX_DESCS, skip_if_unread: bool = False,
                         ) -> tuple[PackedRingSnapshot | None, list[tuple[int, int]]]:
    """:func:`snapshot_packed` and the indirect tables it could not read
    (validate-only memory), as :func:`inspector.ring.reference.snapshot_split_pass`."""
    check_packed_args(size, desc, driver_event, device_event, next_used, used_wrap_counter,
                      last_avail_idx, last_avail_wrap_counter, max_descs)
    m = _Mem(region_table(mem), valid_table(mem))
    areas = []
    for i, (addr, length) in enumerate(zip((desc, driver_event, device_event),
                                           packed_area_sizes(size))):
        where = m.find(addr, length)
        if where is None:
            raise area_error(i, addr, length, PACKED_AREAS)
        areas.append(where)
    dv, doff = areas[0]
    ring_flags, ring_id = array(U16), array(U16)
    for i in range(size):
        _addr, _len, id_, flags = _PDESC.unpack_from(dv, doff + 16 * i)
        ring_id.append(id_)
        ring_flags.append(flags)
    drv_desc, drv_flags = _EVENT.unpack_from(*areas[1])
    dev_desc, dev_flags = _EVENT.unpack_from(*areas[2])

    w = _Walk(m, size, max_descs, packed=True)
    ring = _Ring(ring_flags, size)
    nu, uw, la = next_used, used_wrap_counter, last_avail_idx
    ca: int | None = None
    # --- the device's positions, as counters
    if uw is not None:
        positions = "device"
        cu = packed_counter(nu, uw, size)
        if la is not None:
            ca = packed_counter(la, last_avail_wrap_counter, size)
    elif nu is not None:
        positions = "derived"
        dw = ring.derive(nu)
        # every descriptor outstanding: with the other counter, all size slots available
        cf = packed_counter(nu, 1 - dw, size)
        full = all(ring.avail_at(cf + k) for k in range(size))
        if full:
            dw = 1 - dw
        cu = packed_counter(nu, dw, size)
        if la is not None:
            lw = ring.derive(la)
            if full and la == nu:
                lw = dw  # nothing taken (module docstring)
            ca = packed_counter(la, lw, size)
    else:
        positions = "flags"
        a0 = ring.a(0)
        k = next((i for i in range(1, size) if ring.a(i) != a0), size)
        na0 = packed_counter(0, 1 - a0, size) if k == size else packed_counter(k, a0, size)
        cu = (na0 - size) % (2 * size)
        for j in range(1, size + 1):
            c = (na0 - j) % (2 * size)
            if ring.used_at(c):
                cu = (c + 1) % (2 * size)
                break
    if ca is not None and packed_distance(cu, ca, size) > size:
        ca = None  # more than size ahead of next_used: not a position of this ring

    # --- used descriptors where the driver's buffers are outstanding
    if positions != "flags":
        n = packed_distance(cu, ca, size) if ca is not None else 0
        for k in range(max(n, 1)):
            c = (cu + k) % (2 * size)
            if ring.used_at(c):
                s = c % size
                us, uwr = packed_position(cu, size)
                w.anomaly(K.USED_NOT_AVAILABLE,
                          f"desc[{s}] is a used descriptor (id {ring_id[s]}, flags 0x{ring_flags[s]:x}) "
                          f"at or after next_used (slot {us}, wrap {uwr}) where the driver's buffer "
                          f"is outstanding", None)

    # --- the walk
    start = ca if ca is not None else cu
    limit = size - packed_distance(cu, start, size)
    walked = 0
    chain_head, chain_slot, chain_first, chain_ndescs = array(U32), array(U32), array(U32), array(U32)
    chain_out_bytes, chain_in_bytes = array(U64), array(U64)
    stop = False
    while not stop and walked < limit and ring.avail_at(start + walked):
        c = (start + walked) % (2 * size)
        slot0 = c % size
        last_id = 0
        clen = 0
        w.slot = w.head = slot0
        w.ndescs = w.out_bytes = w.in_bytes = 0
        chain_slot.append(slot0)
        chain_first.append(len(w.desc_addr))
        while True:
            s = c % size
            addr, length, _id, _flags = _PDESC.unpack_from(dv, doff + 16 * s)
            flags, id_ = ring_flags[s], ring_id[s]
            d = (addr, length, flags, id_)
            walked += 1
            clen += 1
            last_id = id_
            if flags & VRING_DESC_F_INDIRECT:
                # §2.8.7: not INDIRECT and NEXT together; the indirect
                # descriptor is the chain's only one, its table is listed.
                if flags & VRING_DESC_F_NEXT:
                    w.anomaly(K.INDIRECT_WITH_NEXT,
                              f"desc[{s}].flags = 0x{flags:x} sets both VRING_DESC_F_INDIRECT and "
                              f"VRING_DESC_F_NEXT (chain at slot {slot0})", slot0)
                _walk_indirect(w, s, d)
                break
            if w.budget_ok():
                w.emit(d, f"desc[{s}]")
            if not flags & VRING_DESC_F_NEXT:
                break
            if walked >= limit:
                # §2.8.6: never more descriptors than the ring holds.
                w.anomaly(K.CHAIN_TOO_LONG,
                          f"chain at slot {slot0} has VRING_DESC_F_NEXT on {clen} descriptors: "
                          f"longer than the {limit} slots the ring holds from next_used "
                          f"(size {size})", slot0)
                break
            c = (c + 1) % (2 * size)
            if not ring.avail_at(c):
                # §2.8.6: every descriptor of a chain is made available.
                ns, nw = packed_position(c, size)
                w.anomaly(K.AVAIL_USED_PATTERN,
                          f"desc[{s}] sets VRING_DESC_F_NEXT but desc[{ns}] (flags "
                          f"0x{ring_flags[ns]:x}) is not available for wrap {nw} "
                          f"(chain at slot {slot0})", slot0)
                stop = True
                break
        chain_head.append(last_id)
        chain_ndescs.append(w.ndescs)
        chain_out_bytes.append(w.out_bytes)
        chain_in_bytes.append(w.in_bytes)
        if last_id >= size:
            # §2.8.6: the buffer id names one of the ring's size buffers.
            w.anomaly(K.ID_OUT_OF_RANGE,
                      f"buffer id {last_id} of the chain at slot {slot0} is >= size {size}", slot0)
    cna = (start + walked) % (2 * size)

    # --- §2.8.1: one step in the AVAIL bits before next_avail
    r = 0
    while r < size - 1 and ring.avail_at(cna + 1 + r):
        r += 1
    for j in range(1, size - r):
        c = (cna - j) % (2 * size)
        s, wc = packed_position(c, size)
        if ring.a(s) != wc:
            ns, nw = packed_position(cna, size)
            w.anomaly(K.AVAIL_USED_PATTERN,
                      f"desc[{s}].flags = 0x{ring_flags[s]:x}: VIRTQ_DESC_F_AVAIL is {ring.a(s)}, "
                      f"not the wrap {wc} of the round it was written in before next_avail "
                      f"(slot {ns}, wrap {nw})", None)
            break

    if skip_if_unread and w.unread:
        return None, w.unread
    na_slot, na_wrap = packed_position(cna, size)
    nu_slot, nu_wrap = packed_position(cu, size)
    la_pos = packed_position(ca, size) if ca is not None else (None, None)
    return PackedRingSnapshot(
        size=size, next_avail=na_slot, avail_wrap_counter=na_wrap, next_used=nu_slot,
        used_wrap_counter=nu_wrap, last_avail_idx=la_pos[0], last_avail_wrap_counter=la_pos[1],
        **event_fields(drv_desc, drv_flags, dev_desc, dev_flags),
        positions=positions, ring_flags=ring_flags, ring_id=ring_id,
        desc_addr=w.desc_addr, desc_len=w.desc_len, desc_flags=w.desc_flags, desc_next=w.desc_next,
        chain_head=chain_head, chain_slot=chain_slot, chain_first=chain_first,
        chain_ndescs=chain_ndescs, chain_out_bytes=chain_out_bytes, chain_in_bytes=chain_in_bytes,
        anomalies=w.anomalies), w.unread


def event_fields(drv_desc: int, drv_flags: int, dev_desc: int, dev_flags: int) -> dict[str, int]:
    """The ``driver_event_*`` / ``device_event_*`` header fields from the two
    ``struct pvirtq_event_suppr`` as read (§2.8.10): ``off`` bits 0..14 and
    ``wrap`` bit 15 of ``desc``; ``flags`` the whole le16 (values above
    RING_EVENT_FLAGS_DESC are reserved and shown as they are)."""
    return {"driver_event_flags": drv_flags, "driver_event_off": drv_desc & RING_EVENT_OFF_MASK,
            "driver_event_wrap": drv_desc >> RING_EVENT_WRAP_SHIFT & 1,
            "device_event_flags": dev_flags, "device_event_off": dev_desc & RING_EVENT_OFF_MASK,
            "device_event_wrap": dev_desc >> RING_EVENT_WRAP_SHIFT & 1}


def _walk_indirect(w: _Walk, di: int, d: tuple[int, int, int, int]) -> None:
    """§2.8.7: the table of desc[di] is len / 16 descriptors used in order
    (no next; NEXT and id are reserved there)."""
    where = w.indirect_table(di, d)
    if where is None:
        return
    view, off = where
    for j in range(d[1] // 16):
        if not w.budget_ok():
            return
        addr, length, id_, flags = _PDESC.unpack_from(view, off + 16 * j)
        if flags & VRING_DESC_F_INDIRECT:
            # §2.8.7: no INDIRECT within an indirect table.
            w.anomaly(K.NESTED_INDIRECT,
                      f"desc[{di}]->indirect[{j}].flags = 0x{flags:x} sets VRING_DESC_F_INDIRECT "
                      f"(chain at slot {w.head})", w.head)
            return
        w.emit((addr, length, flags, id_), f"desc[{di}]->indirect[{j}]")

__all__ = ["event_fields", "snapshot_packed", "snapshot_packed_pass"]
