"""A back-end connection's device IOTLB (csrc/vqd_iotlb.h): the IOVA ->
front-end address translations the front-end hands out with
VHOST_USER_IOTLB_MSG once VIRTIO_F_ACCESS_PLATFORM is negotiated, as the C
data paths use them, and the misses its queues ask the front-end for.

:class:`Iotlb` validates every UPDATE / INVALIDATE (hostile front-ends:
:class:`IotlbRejected` names the field and value), maps each entry's uaddr
through the connection's memory table to a host pointer, and dedupes misses
(one VHOST_USER_BACKEND_IOTLB_MSG per IOVA page and access, again at most
every :data:`MISS_RESEND_S` while unanswered). Spec: vhost-user
"IOMMU support" and struct vhost_iotlb_msg (include/uapi/linux/vhost_types.h).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .._cffi import ffi, lib
from ..errors import InspectorError, MemoryAccessError
from ..spec.vhost import VHOST_ACCESS_NAMES, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO
from .queue import RegionTable

#: Seconds before an unanswered miss is asked again.
MISS_RESEND_S = 1.0
#: A miss is deduped per page of this size (the granularity QEMU's vIOMMUs answer with).
MISS_PAGE = 4096

if (lib.VQD_ACCESS_RO, lib.VQD_ACCESS_WO, lib.VQD_ACCESS_RW) != (VHOST_ACCESS_RO, VHOST_ACCESS_WO,
                                                                 VHOST_ACCESS_RW):
    raise ImportError("csrc/vqd_iotlb.h VQD_ACCESS_* differ from spec.vhost VHOST_ACCESS_*")

logger = logging.getLogger("inspector.datapath.iotlb")


class IotlbRejected(InspectorError):
    """An IOTLB message the back-end refused: ``field`` of struct
    vhost_iotlb_msg had ``value``, ``reason`` says why. Nothing changed."""

    def __init__(self, field: str, value: int, reason: str):
        super().__init__(f"{field}={value:#x}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class IotlbMiss(InspectorError):
    """A range has no translation (yet): ``iova`` is the first unmapped byte."""

    def __init__(self, iova: int, perm: int, what: str):
        super().__init__(f"{what}: IOVA {iova:#x} ({VHOST_ACCESS_NAMES.get(perm, perm)}) is not in the IOTLB")
        self.iova = iova
        self.perm = perm


def access_name(perm: int) -> str:
    """"ro" / "wo" / "rw" for a VHOST_ACCESS_* value (else its number)."""
    return VHOST_ACCESS_NAMES.get(perm, str(perm))


class Iotlb:
    """One connection's IOTLB. ``capacity``: entries kept (a full table
    evicts one; an evicted translation misses again). ``miss_sink(iova,
    perm)``: sends a miss to the front-end, returns whether it went out (set
    by the connection; None: misses are only counted). ``mirror``: only
    record what the front-end said (a proxy watching a connection): entries
    get no host pointer and the table is never attached to a queue.
    Thread-safe: the data path threads call :meth:`ask`, the connection's
    thread the rest."""

    def __init__(self, capacity: int = lib.VQD_IOTLB_DEFAULT_CAPACITY,
                 miss_sink: Callable[[int, int], bool] | None = None, *, mirror: bool = False):
        p = lib.vqd_iotlb_new(capacity)
        if p == ffi.NULL:
            raise InspectorError(f"cannot allocate an IOTLB of {capacity} entries")
        self.ptr = p
        self.capacity = capacity
        self.miss_sink = miss_sink
        self.mirror = mirror
        self._mem = None
        self._regions: RegionTable | None = None
        self._lock = threading.Lock()
        self._asked: dict[tuple[int, int], float] = {}
        self._wakers: dict[int, Callable[[], None]] = {}
        self.misses_sent = 0
        self.rejected = 0

    # --- memory table ----------------------------------------------------------------
    def set_memory(self, mem) -> None:
        """The connection's memory table changed (``mem``: GuestMemory, or
        None): every entry goes (its host pointer pointed into the old
        mappings), as DPDK flushes its IOTLB at SET_MEM_TABLE."""
        lib.vqd_iotlb_flush(self.ptr)
        if self._regions is not None:
            self._regions.release()
        self._regions = RegionTable(mem) if mem is not None and not self.mirror else None
        self._mem = mem

    # --- front-end messages -------------------------------------------------------------
    def update(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        """VHOST_IOTLB_UPDATE: map ``[iova, iova + size)`` to front-end
        address ``uaddr`` with ``perm``. True: added; False: an identical
        entry was there. Raises IotlbRejected (size 0, a range past 2^64,
        a bad perm, uaddr outside one memory-table region, an overlap with
        a different entry)."""
        if size == 0:
            raise self._reject("size", size, "a mapping cannot be empty")
        for fld, start in (("iova", iova), ("uaddr", uaddr)):
            if start + size - 1 > 0xFFFF_FFFF_FFFF_FFFF:
                raise self._reject(fld, start, f"+ size {size:#x} runs past 2^64")
        if perm not in (VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW):
            raise self._reject("perm", perm, "not VHOST_ACCESS_RO (1), WO (2) or RW (3)")
        if self._mem is None:
            raise self._reject("uaddr", uaddr, "no memory table yet (SET_MEM_TABLE first)")
        try:
            gpa = self._mem.uva_to_gpa(uaddr, size)
            host = self._regions.host(gpa, size) if self._regions is not None else ffi.NULL
        except MemoryAccessError as e:
            raise self._reject("uaddr", uaddr, f"+ size {size:#x} is not inside one memory-table region "
                                               f"({e})") from None
        conflict = ffi.new("struct vqd_iotlb_entry *")
        rc = lib.vqd_iotlb_update(self.ptr, iova, size, uaddr, host, perm, conflict)
        if rc == lib.VQD_IOTLB_E_OVERLAP:
            raise self._reject("iova", iova,
                               f"+ size {size:#x} overlaps the entry {conflict.iova:#x}+{conflict.size:#x} -> "
                               f"{conflict.uaddr:#x} ({access_name(conflict.perm)}); INVALIDATE it first")
        if rc < 0:
            raise self._reject("iova", iova, f"refused by the IOTLB (status {rc})")
        if rc == lib.VQD_IOTLB_ADDED:
            self._answered(iova, size)
        return rc == lib.VQD_IOTLB_ADDED

    def invalidate(self, iova: int, size: int) -> tuple[int, bool]:
        """VHOST_IOTLB_INVALIDATE: drop every entry overlapping ``[iova,
        iova + size)`` (whole entries, as the kernel's
        vhost_iotlb_del_range). Returns only after no data-path burst can
        still use them. Returns ``(dropped, clamped)``: the entries dropped
        (0: none held the range, which QEMU does routinely and is no error)
        and whether the range was malformed, i.e. size 0 or past 2^64, and
        read as running to the end of the IOVA space: QEMU's ``addr_mask +
        1`` overflows to 0 for a whole-space flush, and dropping more than
        asked only costs misses, while keeping a revoked translation would
        let the device touch memory the guest took back."""
        end = iova + size - 1
        clamped = size == 0 or end > 0xFFFF_FFFF_FFFF_FFFF
        last = 0xFFFF_FFFF_FFFF_FFFF if clamped else end
        return lib.vqd_iotlb_invalidate(self.ptr, iova, last), clamped

    def _reject(self, field: str, value: int, reason: str) -> IotlbRejected:
        self.rejected += 1
        return IotlbRejected(field, value, reason)

    # --- lookups ----------------------------------------------------------------------
    def translate(self, iova: int, size: int, perm: int, what: str) -> int:
        """The front-end address of ``[iova, iova + size)`` for an access
        needing ``perm``, which must translate contiguously (a ring area).
        IotlbMiss when a byte of it has no entry; IotlbRejected when an
        entry refuses ``perm`` or the range is not contiguous in front-end
        memory."""
        first = ffi.new("struct vqd_iotlb_entry *")
        rc = lib.vqd_iotlb_lookup(self.ptr, iova, size, perm, first)
        if rc == lib.VQD_IOTLB_MISS:
            raise IotlbMiss(iova, perm, what)
        if rc == lib.VQD_IOTLB_PERM:
            raise IotlbRejected("perm", first.perm, f"{what} at IOVA {iova:#x} needs {access_name(perm)}, the "
                                                     f"entry {first.iova:#x}+{first.size:#x} gives "
                                                     f"{access_name(first.perm)}")
        if rc < size:
            nxt = iova + rc
            more = lib.vqd_iotlb_lookup(self.ptr, nxt, size - rc, perm, ffi.NULL)
            if more == lib.VQD_IOTLB_MISS:
                raise IotlbMiss(nxt, perm, what)
            raise IotlbRejected("iova", iova, f"{what} {iova:#x}+{size:#x} is not contiguous in front-end "
                                              f"memory through the IOTLB")
        return first.uaddr + (iova - first.iova)

    def entries(self) -> list[tuple[int, int, int, int]]:
        """A copy of the table: ``(iova, size, uaddr, perm)`` sorted by iova."""
        n = lib.vqd_iotlb_copy(self.ptr, ffi.NULL, 0, ffi.NULL)
        out = ffi.new("struct vqd_iotlb_entry[]", max(n, 1) + 64)
        n = lib.vqd_iotlb_copy(self.ptr, out, max(n, 1) + 64, ffi.NULL)
        n = min(n, max(n, 1) + 64)
        return [(out[i].iova, out[i].size, out[i].uaddr, out[i].perm) for i in range(n)]

    def stats(self) -> dict[str, int]:
        """Counters for the snapshot: entries, capacity, updates,
        invalidations, invalidations_unmapped, evictions, misses (sent),
        rejected (messages refused)."""
        st = ffi.new("struct vqd_iotlb_stats *")
        lib.vqd_iotlb_copy(self.ptr, ffi.NULL, 0, st)
        return {"entries": st.entries, "capacity": st.capacity, "updates": st.updates,
                "invalidations": st.invalidations, "invalidations_unmapped": st.invalidations_unmapped,
                "evictions": st.evictions, "misses": self.misses_sent, "rejected": self.rejected}

    # --- misses -----------------------------------------------------------------------
    def ask(self, iova: int, perm: int) -> bool:
        """A queue missed at ``iova`` needing ``perm``: send the miss unless
        the same page and access was asked less than MISS_RESEND_S ago.
        True when a miss went out."""
        key = (iova // MISS_PAGE, perm)
        now = time.monotonic()
        with self._lock:
            last = self._asked.get(key)
            if last is not None and now - last < MISS_RESEND_S:
                return False
            self._asked[key] = now
            if len(self._asked) > 4096:   # bounded: forget the oldest half
                for k in sorted(self._asked, key=self._asked.get)[:2048]:
                    del self._asked[k]
        sink = self.miss_sink
        if sink is None or not sink(iova, perm):
            return False
        with self._lock:
            self.misses_sent += 1
        return True

    def add_waker(self, key: int, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever an UPDATE adds an entry (a worker
        waiting on a miss); :meth:`remove_waker` with the same ``key``."""
        with self._lock:
            self._wakers[key] = wake

    def remove_waker(self, key: int) -> None:
        with self._lock:
            self._wakers.pop(key, None)

    def _answered(self, iova: int, size: int) -> None:
        """An UPDATE added ``[iova, iova + size)``: the pages it covers may be
        asked again (a later miss there is a new one); the workers wake."""
        first, last = iova // MISS_PAGE, (iova + size - 1) // MISS_PAGE
        with self._lock:
            for key in [k for k in self._asked if first <= k[0] <= last]:
                del self._asked[key]
            wakers = list(self._wakers.values())
        for w in wakers:
            try:
                w()
            except OSError:
                pass

    def close(self) -> None:
        """Free the table (after every queue using it was released)."""
        if self._regions is not None:
            self._regions.release()
            self._regions = None
        if self.ptr is not None:
            lib.vqd_iotlb_free(self.ptr)
            self.ptr = None


__all__ = ["Iotlb", "IotlbMiss", "IotlbRejected", "MISS_PAGE", "MISS_RESEND_S", "access_name"]
