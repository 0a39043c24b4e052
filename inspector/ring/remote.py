"""A split or packed ring in another process's guest RAM, read without side
effects.

:func:`snapshot_remote_packed` does for a packed ring (VIRTIO 1.2 §2.8) what
the steps below do for a split one: one ``process_vm_readv`` of the
descriptor ring and the two event suppression areas; a first decode; if the
device's positions given (QEMU's ``used-idx``/``last-avail-idx``, asked
before this read) are older than the ring (a used descriptor at or past
their next_used: ``used_not_available``), the ring is decoded again from the
flags alone (``positions`` "flags", ``last_avail_idx`` None: the caller asks
again); indirect tables not read are read in one more ``process_vm_readv``
with the descriptor ring again, and a chain whose first slot changed
between the two ring reads (the device returned it, the driver may have
reused its table) keeps ``indirect_not_read`` and has its other anomalies
dropped (:func:`forget_returned`, by first slot).

:func:`snapshot_remote_split` decodes a split ring of a guest whose RAM is
mapped in that process. ``ram`` is the guest-physical → host-virtual map
(a list of :class:`RamRange`, built from QMP elsewhere). One refresh:

1. the three ring areas are translated gpa → hva (each must lie in one RAM
   range, else RingError) and gathered in ONE ``process_vm_readv``, in this
   order: the driver area (avail), the device area (used), the descriptor
   table, the device area again. The chains listed are those made
   available before the avail read, so the driver wrote their descriptors
   before the table was read; a chain the device returned meanwhile (its
   head among the used entries between the two used reads) may already
   hold the driver's next use of those descriptors: its anomalies are
   dropped (:func:`forget_returned`), never reported as the driver's fault;
2. a :class:`~inspector.memory.GuestMemory` is built whose readable regions
   are those copies and whose validate-only regions are the RAM ranges: the
   decoder accepts buffers anywhere in guest RAM but reads only the copies;
3. first pass: decode. Indirect tables that lie in RAM but were not read are
   returned by ``snapshot_split_pass`` (and are ``indirect_not_read``
   anomalies of that pass only);
4. if there are any, they are gathered in ONE more ``process_vm_readv``
   (at most one per chain so at most ``size``, each at most the decoder's
   16·32768-byte bound; deduplicated, tables less than SPAN_GAP apart read
   as one span, at most 16·max_descs bytes in all), added as readable
   regions, and the ring is decoded again from the same ring-area copies. Only this second result is returned: a table that
   could be read leaves no trace; one that could not (over the byte budget,
   or unmapped in the process) keeps ``indirect_not_read`` on its chain.
   The same read takes the device area again, after the tables: a chain
   the device returned between the two reads (its head in the used ring
   between the two ``used->idx``) may have had its table freed and reused
   by the driver (Linux kfree()s it in detach_buf_split), so the bytes read
   there are not that chain's. Its tables are left out (it keeps
   ``indirect_not_read``) instead of being reported as the driver's fault;
   a chain still in flight owns its table (VIRTIO 1.2 §2.7.5.3.1: the
   driver does not write it until used), so what is wrong in it is real.

Guest memory is hostile: both passes are the bounded decoder walks, and the
second pass cannot ask for new tables (its chains are those of the first,
whose direct descriptors come from the same copy).
"""

from __future__ import annotations

import struct

from ..errors import RingError
from ..memory import GuestMemory
from ..memory.process import ProcessMemory, RamRange, ram_hva
from ..spec.virtio import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from . import decoder
from .anomalies import AnomalyKind
from .checks import (AREAS, DEFAULT_MAX_DESCS, PACKED_AREAS, area_sizes, check_args,
                     check_packed_args, packed_area_sizes, ring_between)
from .packed import PackedRingSnapshot
from .snapshot import RingSnapshot

#: Indirect tables closer than this (same RAM range) are read as one span:
#: the driver's allocator packs them (Linux: kmalloc-64/-128 slabs), and one
#: region per span keeps the region tables short; the gap bytes are cheap.
SPAN_GAP = 4096


def table_spans(tables: list[tuple[int, int]], ram: list[RamRange], budget: int,
                gap: int = SPAN_GAP) -> list[tuple[int, int, int]]:
    """``(gpa, size, hva)`` spans to read for the indirect ``tables``
    (``(gpa, len)``, duplicates allowed): sorted by gpa, tables at most
    ``gap`` bytes apart inside one RAM range merged, at most ``budget``
    bytes in all (a table that does not fit is left out, and stays
    ``indirect_not_read``)."""
    spans: list[tuple[int, int, int]] = []  # (gpa, size, hva)
    used = 0
    start = end = limit = hva0 = 0  # the open span [start, end), its RAM range ends at limit
    is_open = False
    for gpa, n in sorted(tables):  # a duplicate follows its twin: grows nothing
        if is_open and end + gap >= gpa and gpa + n <= limit:
            grow = max(end, gpa + n) - end
            if used + grow <= budget:
                used += grow
                end += grow
                continue
        r = next((r for r in ram if r.gpa <= gpa and gpa + n <= r.gpa + r.size), None)
        if r is None or used + n > budget:
            continue
        hva = r.hva + (gpa - r.gpa)
        if is_open:
            spans.append((start, end - start, hva0))
        start, end, limit, hva0, is_open = gpa, gpa + n, r.gpa + r.size, hva, True
        used += n
    if is_open:
        spans.append((start, end - start, hva0))
    return spans


def returned_heads(used_before: bytes | memoryview, used_after: bytes | memoryview,
                   size: int) -> set[int] | None:
    """Heads the device returned between two reads of the device area
    (``used_before``, ``used_after``: its bytes, §2.7.8): the ids of the
    used entries between the two ``used->idx``, as the second read has them.
    None when ``used->idx`` moved by ``size`` or more: every entry was
    rewritten, so any chain may have been returned."""
    u1 = struct.unpack_from("<H", used_before, 2)[0]
    u2 = struct.unpack_from("<H", used_after, 2)[0]
    n = (u2 - u1) & 0xFFFF
    if n >= size:
        return None
    return {struct.unpack_from("<I", used_after, 4 + 8 * ((u1 + k) % size))[0] for k in range(n)}


def returned_tables(desc: bytes | memoryview, size: int, heads: set[int]) -> list[tuple[int, int]]:
    """The indirect tables ``(gpa, len)`` of the chains of ``heads`` (the
    device returned them: :func:`returned_heads`), walking each head's
    chain in ``desc`` (the descriptor table as read; at most ``size`` steps
    per head)."""
    out = []
    for h in heads:
        for _ in range(size):
            if h >= size:
                break
            addr, length, flags, nxt = struct.unpack_from("<QIHH", desc, 16 * h)
            if flags & VRING_DESC_F_INDIRECT:
                out.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                break
            h = nxt
    return out


def forget_returned(snap: RingSnapshot | PackedRingSnapshot, heads: set[int] | None):
    """Drop from ``snap`` the anomalies found in the walk of a chain whose
    head (:attr:`Anomaly.head <inspector.ring.anomalies.Anomaly.head>`) is
    in ``heads`` (None: of every chain), ``indirect_not_read`` kept: the
    device returned those chains while the ring was being read, so their
    descriptors or tables may already be the driver's next use of that
    memory, not a fault. Anomalies of no chain (head None: the ring's
    ``avail_idx_jump``, ``head_out_of_range``, ``truncated``) are kept."""
    if heads is None or heads:
        snap.anomalies = [a for a in snap.anomalies
                          if a.head is None or a.kind is AnomalyKind.INDIRECT_NOT_READ
                          or (heads is not None and a.head not in heads)]
    return snap


def snapshot_remote_split(pmem: ProcessMemory, ram: list[RamRange], size: int, desc_gpa: int,
                          avail_gpa: int, used_gpa: int, last_avail_idx: int | None, *,
                          impl=decoder, max_descs: int = DEFAULT_MAX_DESCS) -> RingSnapshot:
    """Snapshot the split ring at ``desc_gpa``/``avail_gpa``/``used_gpa``
    (guest-physical) in the guest RAM ``ram`` of process ``pmem``, with
    decoder ``impl`` (:mod:`inspector.ring.decoder` or :mod:`inspector.ring.reference`);
    see the module docstring. A ``last_avail_idx`` not between this read's
    ``used->idx`` and ``avail->idx`` is older than the read and is not used
    (the result's ``last_avail_idx`` is None). Raises RingError when a ring area is not
    inside one RAM range, ProcessReadError / ProcessExitedError /
    ProcessAccessError when the process cannot be read."""
    check_args(size, desc_gpa, avail_gpa, used_gpa, last_avail_idx, max_descs)
    areas = list(zip((desc_gpa, avail_gpa, used_gpa), area_sizes(size)))
    ranges = _area_ranges(pmem, ram, areas, AREAS)
    # One read: the driver area, the device area, the descriptor table, then
    # the device area again (see the module docstring).
    buf, offs = pmem.gather([ranges[1], ranges[2], ranges[0], ranges[2]])
    view = memoryview(buf)
    offsets = (offs[2], offs[0], offs[1])          # desc, avail, used, as decoded
    used_n = areas[2][1]
    used_first = view[offs[1]:offs[1] + used_n]
    used_last = view[offs[3]:offs[3] + used_n]
    if last_avail_idx is not None and not ring_between(
            struct.unpack_from("<H", used_first, 2)[0], last_avail_idx,
            struct.unpack_from("<H", view, offs[0] + 2)[0]):
        # The device's last_avail_idx (QMP, a probe) is older than this read:
        # the device keeps used <= last_avail <= avail, so decoded from it,
        # returned chains would show as available. Decode without it; the
        # result's last_avail_idx says None.
        last_avail_idx = None
    mem = GuestMemory()
    for (gpa, n), (hva, _), off in zip(areas, ranges, offsets):
        mem.add(gpa, buf, uva=hva, size=n, buf_offset=off)
    for r in ram:
        mem.add_valid(r.gpa, r.size, uva=r.hva)
    snap, unread = impl.snapshot_split_pass(mem, size, desc_gpa, avail_gpa, used_gpa,
                                            last_avail_idx, max_descs=max_descs,
                                            skip_if_unread=True)
    if not unread:
        return forget_returned(snap, returned_heads(used_first, used_last, size))
    # Second pass: the unread indirect tables, coalesced into spans, within
    # budget; then the device area again (see the module docstring).
    tables = table_spans(unread, ram, 16 * max_descs)
    used_hva = ranges[2][0]
    tbuf, toffs, failed = pmem.gather_partial([(hva, n) for _, n, hva in tables] + [(used_hva, used_n)])
    if len(tables) not in failed:
        used_last = memoryview(tbuf)[toffs[-1]:toffs[-1] + used_n]
    returned = returned_heads(used_first, used_last, size)
    stale = None if returned is None else returned_tables(view[offsets[0]:offsets[0] + areas[0][1]],
                                                           size, returned)
    if stale is not None:   # None: the ring turned over meanwhile; no table is sure
        for k, ((gpa, n, hva), off) in enumerate(zip(tables, toffs)):
            if k in failed:
                continue
            if not stale or not any(a < gpa + n and gpa < a + ln for a, ln in stale):
                mem.add(gpa, tbuf, uva=hva, size=n, buf_offset=off)
                continue
            # The span holds a returned chain's table: add the others one by one.
            for a, ln in set(unread):
                if gpa <= a and a + ln <= gpa + n and \
                        not any(b < a + ln and a < b + m for b, m in stale):
                    mem.add(a, tbuf, uva=hva + a - gpa, size=ln, buf_offset=off + a - gpa)
    snap = impl.snapshot_split_pass(mem, size, desc_gpa, avail_gpa, used_gpa, last_avail_idx,
                                    max_descs=max_descs)[0]
    return forget_returned(snap, returned)



def _area_ranges(pmem: ProcessMemory, ram: list[RamRange], areas: list[tuple[int, int]],
                 names: tuple[str, ...]) -> list[tuple[int, int]]:
    """``(hva, n)`` of each ring area ``(gpa, n)``; RingError naming the
    area when it is not inside one RAM range."""
    ranges = []
    for i, (gpa, n) in enumerate(areas):
        hva = ram_hva(ram, gpa, n)
        if hva is None:
            raise RingError(f"{names[i]} at guest-physical 0x{gpa:x} (+0x{n:x} bytes) is not "
                            f"inside one guest RAM range of process {pmem.pid}: check the queue "
                            f"addresses and the guest RAM map")
        ranges.append((hva, n))
    return ranges


def snapshot_remote_packed(pmem: ProcessMemory, ram: list[RamRange], size: int, desc_gpa: int,
                           driver_event_gpa: int, device_event_gpa: int, *,
                           next_used: int | None = None, used_wrap_counter: int | None = None,
                           last_avail_idx: int | None = None,
                           last_avail_wrap_counter: int | None = None, impl=decoder,
                           max_descs: int = DEFAULT_MAX_DESCS) -> PackedRingSnapshot:
    """Snapshot the packed ring at ``desc_gpa`` with its driver and device
    event suppression areas (guest-physical) in the guest RAM ``ram`` of
    process ``pmem``, with decoder ``impl`` (:mod:`inspector.ring.decoder`
    or :mod:`inspector.ring.reference_packed`); positions as
    ``impl.snapshot_packed`` takes them; see the module docstring (positions
    older than the ring: decoded from the flags). Raises RingError when a
    ring area is not inside one RAM range, ProcessReadError /
    ProcessExitedError / ProcessAccessError when the process cannot be read."""
    pos = dict(next_used=next_used, used_wrap_counter=used_wrap_counter,
               last_avail_idx=last_avail_idx, last_avail_wrap_counter=last_avail_wrap_counter)
    check_packed_args(size, desc_gpa, driver_event_gpa, device_event_gpa, max_descs=max_descs, **pos)
    areas = list(zip((desc_gpa, driver_event_gpa, device_event_gpa), packed_area_sizes(size)))
    ranges = _area_ranges(pmem, ram, areas, PACKED_AREAS)
    buf, offs = pmem.gather(ranges)
    mem = GuestMemory()
    for (gpa, n), (hva, _), off in zip(areas, ranges, offs):
        mem.add(gpa, buf, uva=hva, size=n, buf_offset=off)
    for r in ram:
        mem.add_valid(r.gpa, r.size, uva=r.hva)
    args = (mem, size, desc_gpa, driver_event_gpa, device_event_gpa)
    snap, unread = impl.snapshot_packed_pass(*args, max_descs=max_descs, **pos)
    if next_used is not None and any(a.kind is AnomalyKind.USED_NOT_AVAILABLE for a in snap.anomalies):
        # The device wrote used descriptors at or past the next_used given:
        # the positions are older than this read (the caller asked before
        # it). Decode from the flags; the caller may ask again.
        pos = {}
        snap, unread = impl.snapshot_packed_pass(*args, max_descs=max_descs)
    if not unread:
        return snap
    # Second pass: the unread indirect tables (within budget) and the
    # descriptor ring again, to see which chains changed meanwhile.
    tables = table_spans(unread, ram, 16 * max_descs)
    ring_n = areas[0][1]
    tbuf, toffs, failed = pmem.gather_partial([(hva, n) for _, n, hva in tables] + [(ranges[0][0], ring_n)])
    first = memoryview(buf)[offs[0]:offs[0] + ring_n]
    changed: set[int] | None = None   # first slots of chains whose slot changed; None: cannot tell
    if len(tables) not in failed:
        again = memoryview(tbuf)[toffs[-1]:toffs[-1] + ring_n]
        changed = {s for s in snap.chain_slot.tolist() if first[16 * s:16 * s + 16] != again[16 * s:16 * s + 16]}
    # the tables of changed chains (as first read): not theirs any more
    stale_tables = _packed_tables(first, size, sorted(changed or ()))
    for k, ((gpa, n, hva), off) in enumerate(zip(tables, toffs)):
        if k in failed or changed is None:
            continue
        if not any(a < gpa + n and gpa < a + ln for a, ln in stale_tables):
            mem.add(gpa, tbuf, uva=hva, size=n, buf_offset=off)
            continue
        for a, ln in set(unread):
            if gpa <= a and a + ln <= gpa + n and not any(b < a + ln and a < b + m for b, m in stale_tables):
                mem.add(a, tbuf, uva=hva + a - gpa, size=ln, buf_offset=off + a - gpa)
    snap = impl.snapshot_packed_pass(*args, max_descs=max_descs, **pos)[0]
    return forget_returned(snap, changed)


def _packed_tables(ring: bytes | memoryview, size: int, slots: list[int]) -> list[tuple[int, int]]:
    """The indirect tables ``(gpa, len)`` of the descriptors at ``slots``
    (a chain's indirect descriptor is its only one, §2.8.7)."""
    out = []
    for s in slots:
        addr, length, _id, flags = struct.unpack_from("<QIHH", ring, 16 * s)
        if flags & VRING_DESC_F_INDIRECT:
            out.append((addr, length))
    return out


__all__ = ["SPAN_GAP", "forget_returned", "returned_heads", "returned_tables",
           "snapshot_remote_packed", "snapshot_remote_split", "table_spans"]
