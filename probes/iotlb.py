"""The kernel's device IOTLB of a vhost device (``struct vhost_iotlb``,
drivers/vhost/iotlb.c), mirrored in user space from what the vhost_net
probe reports.

The kernel keeps, per device with the IOTLB on (``dev->iotlb``, also
``vq->iotlb`` of each of its vrings), an interval tree and a list of
``struct vhost_iotlb_map {start, last, addr, perm}``: IOVAs ``start`` to
``last`` (inclusive) at user address ``addr`` with permission ``perm``
(VHOST_ACCESS_RO/WO/RW). What changes it:

- ``vhost_iotlb_add_range_ctx(iotlb, start, last, addr, perm, opaque)``
  (a VHOST_IOTLB_UPDATE: ``vhost_process_iotlb_msg``); overlapping maps are
  allowed; when the tree holds ``limit`` maps and ``flags`` has
  VHOST_IOTLB_FLAG_RETIRE, the oldest map (first on the list) goes first;
- ``vhost_iotlb_del_range(iotlb, start, last)`` (a VHOST_IOTLB_INVALIDATE):
  every map that overlaps ``[start, last]`` goes, whole (maps are not
  split);
- ``vhost_iotlb_reset(iotlb)`` (``vhost_iotlb_free`` when the device is
  cleaned up): every map goes.

The probe reports each call as an :class:`IotlbOp`, and once per IOTLB the
maps already on its list when vqscope first saw one of its vrings (a
bounded walk, ``OP_SEEN``; ``OP_WALK_TRUNCATED`` when the list was longer
than the walk). :class:`IotlbMirror` applies them in order. It is bounded
(:data:`MAX_MAPS`) and takes hostile values as the kernel does (a range
with ``last < start`` is refused there, so here too).

Pure: no BPF, no root; the unit tests feed literal operations.
"""

from __future__ import annotations

from dataclasses import dataclass

# IotlbOp.op (the program's IOTLB_OP_* #defines)
OP_ADD, OP_DEL, OP_SEEN, OP_RESET, OP_WALK_TRUNCATED = 1, 2, 3, 4, 5
OP_NAMES = {OP_ADD: "add", OP_DEL: "del", OP_SEEN: "seen", OP_RESET: "reset",
            OP_WALK_TRUNCATED: "walk_truncated"}
#: include/linux/vhost_iotlb.h: retire the oldest map when the IOTLB is full.
VHOST_IOTLB_FLAG_RETIRE = 0x1
#: Most maps one mirror keeps (the kernel's default max_iotlb_entries is 2048).
MAX_MAPS = 16384
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class IotlbMap:
    """One ``struct vhost_iotlb_map``: IOVAs ``start`` .. ``last``
    (inclusive) at user address ``addr`` of the device's owner, device
    access ``perm`` (VHOST_ACCESS_RO 1 / WO 2 / RW 3)."""

    start: int
    last: int
    addr: int
    perm: int

    @property
    def size(self) -> int:
        """Bytes covered (``last - start + 1``)."""
        return self.last - self.start + 1


@dataclass(frozen=True)
class IotlbOp:
    """One record of the probe: ``op`` (OP_*), the IOTLB's kernel address,
    the range and, for adds, the user address and permission; ``limit`` and
    ``flags`` the IOTLB's at the time (0 when unknown); ``time_ns``
    CLOCK_MONOTONIC."""

    op: int
    iotlb: int
    start: int = 0
    last: int = 0
    addr: int = 0
    perm: int = 0
    limit: int = 0
    flags: int = 0
    time_ns: int = 0


class IotlbMirror:
    """The maps of one ``struct vhost_iotlb`` as the operations built it,
    in the kernel's list order (oldest first).

    ``complete``: False when the mirror may miss maps: the walk of the maps
    present at attach time was truncated, or maps were dropped at
    :data:`MAX_MAPS` (``dropped``). ``walked``: the maps present before
    the probes attached were read (else only those added since are known).
    ``ops``: operations applied; ``refused``: adds with ``last < start``.
    """

    def __init__(self, max_maps: int = MAX_MAPS):
        self.max_maps = max_maps
        self._maps: list[IotlbMap] = []
        self.walked = False
        self.truncated = False
        self.dropped = 0
        self.refused = 0
        self.ops = 0

    @property
    def complete(self) -> bool:
        return not self.truncated and not self.dropped

    def maps(self) -> list[IotlbMap]:
        """The maps, oldest first (a copy)."""
        return list(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def apply(self, op: IotlbOp) -> None:
        """Apply one probe record (see the module docstring)."""
        self.ops += 1
        if op.op == OP_ADD:
            self.add(op.start, op.last, op.addr, op.perm, limit=op.limit, flags=op.flags)
        elif op.op == OP_SEEN:
            self.walked = True
            m = IotlbMap(op.start, op.last, op.addr, op.perm)
            if op.last >= op.start and m not in self._maps:
                self._append(m)
        elif op.op == OP_DEL:
            self.delete(op.start, op.last)
        elif op.op == OP_RESET:
            self._maps.clear()
            self.walked = True   # empty now: nothing from before is missing
            self.truncated = False
            self.dropped = 0
        elif op.op == OP_WALK_TRUNCATED:
            self.walked = True
            self.truncated = True

    def add(self, start: int, last: int, addr: int, perm: int, *, limit: int = 0, flags: int = 0) -> bool:
        """``vhost_iotlb_add_range_ctx``: refused (False) when ``last <
        start`` or a bound is out of u64; else the oldest map retires first
        when ``limit`` maps are there and ``flags`` has RETIRE."""
        if not (0 <= start <= last <= U64_MAX) or not 0 <= addr <= U64_MAX:
            self.refused += 1
            return False
        if limit and len(self._maps) >= limit and flags & VHOST_IOTLB_FLAG_RETIRE:
            del self._maps[0]
        self._append(IotlbMap(start, last, addr, perm))
        return True

    def _append(self, m: IotlbMap) -> None:
        if len(self._maps) >= self.max_maps:
            del self._maps[0]
            self.dropped += 1
        self._maps.append(m)

    def delete(self, start: int, last: int) -> int:
        """``vhost_iotlb_del_range``: drop every map overlapping ``[start,
        last]`` (whole); returns how many."""
        keep = [m for m in self._maps if m.last < start or m.start > last]
        n = len(self._maps) - len(keep)
        self._maps = keep
        return n


def translation_ranges(maps: list[IotlbMap]) -> list[tuple[int, int, int, int]]:
    """``(iova, size, uaddr, perm)`` ranges of ``maps`` as the kernel's
    lookup sees them, sorted by IOVA, without overlaps: where maps overlap,
    an IOVA translates through the map of lowest ``start`` that holds it
    (``vhost_iotlb_itree_first``, what ``translate_desc`` and
    ``iotlb_access_ok`` use), so a later-starting map keeps only what no
    earlier one covers. Neighbours contiguous in both spaces with the same
    permission are merged (page-granular updates become one range per
    area). Linear in the number of maps after a sort."""
    out: list[list[int]] = []
    covered = 0          # first IOVA not covered by the maps taken so far
    started = False
    for m in sorted(maps, key=lambda m: (m.start, -m.last)):
        start, addr = m.start, m.addr
        if started and m.last < covered:
            continue
        if started and start < covered:
            addr += covered - start
            start = covered
        size = m.last - start + 1
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] + out[-1][1] == addr \
                and out[-1][3] == m.perm:
            out[-1][1] += size
        else:
            out.append([start, size, addr, m.perm])
        covered = m.last + 1
        started = True
    return [tuple(r) for r in out]


__all__ = ["IotlbMap", "IotlbMirror", "IotlbOp", "MAX_MAPS", "OP_ADD", "OP_DEL", "OP_NAMES", "OP_RESET",
           "OP_SEEN", "OP_WALK_TRUNCATED", "VHOST_IOTLB_FLAG_RETIRE", "translation_ranges"]
