"""VIRTIO_F_ACCESS_PLATFORM on one vhost-user connection: the IOTLB
messages (vhost-user "IOMMU support": IOTLB_MSG from the front-end,
BACKEND_IOTLB_MSG misses back on the SET_BACKEND_REQ_FD channel), the
translation of each vring's ring addresses (IOVAs once the feature is
negotiated) before it starts, and the restart of a vring whose ring an
INVALIDATE took away.

The data paths translate buffer addresses themselves, through the C IOTLB
(inspector/datapath/iotlb.py, csrc/vqd_iotlb.h), and ask for their misses
from their own threads through :meth:`IotlbControl.send_miss`.

Hostile input (each refused with one WARNING line, a non-zero REPLY_ACK, the
IOTLB unchanged and the connection going on): a payload that is not 32
bytes, a type other than UPDATE / INVALIDATE, an UPDATE of size 0, past
2^64, with a bad perm, whose uaddr range is not inside one memory-table
region or that overlaps a different entry. An INVALIDATE of size 0 or past
2^64 gets its WARNING line too, but is carried out as running to the end
of the IOVA space (QEMU's whole-space flush has size 0: addr_mask + 1
overflows; dropping too much only costs misses) and acknowledged. An
INVALIDATE of a range holding no entry is no error (QEMU sends one for
every unmap the guest does) and is counted (``invalidations_unmapped``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

from ..datapath.iotlb import Iotlb, IotlbMiss, IotlbRejected, access_name
from ..devices.base import Device, VringConfig
from ..errors import MemoryAccessError, RequestRefused
from ..spec.vhost import (VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO, VHOST_IOTLB_INVALIDATE,
                          VHOST_IOTLB_MSG_STRUCT, VHOST_IOTLB_UPDATE)
from ..spec.virtio import VIRTIO_F_ACCESS_PLATFORM, has_feature
from .protocol import IotlbMsg, MalformedIotlbMsg
from .transport import Message
from .vrings import Vrings, ring_area_sizes

#: The three ring areas of a split vring: (VringConfig field, snapshot name, the device's access).
RING_AREAS = (("desc_uva", "desc", VHOST_ACCESS_RO), ("avail_uva", "avail", VHOST_ACCESS_RO),
              ("used_uva", "used", VHOST_ACCESS_WO))
#: A packed vring's (VIRTIO 1.2 §2.8): the device writes used descriptors into
#: the descriptor ring (§2.8.6) and reads the driver's event suppression area.
PACKED_RING_AREAS = (("desc_uva", "desc", VHOST_ACCESS_RW), ("avail_uva", "avail", VHOST_ACCESS_RO),
                     ("used_uva", "used", VHOST_ACCESS_WO))


def ring_areas(v: VringConfig) -> list[tuple[str, str, int, int]]:
    """``(field, name, access, size)`` of each ring area of ``v``."""
    return [(fld, what, perm, size) for (fld, what, perm), size
            in zip(PACKED_RING_AREAS if v.packed else RING_AREAS, ring_area_sizes(v.num, v.packed))]


class IotlbControl:
    """The IOTLB side of a connection to ``device`` over ``rings``.
    ``send_miss(iova, perm)``: puts a miss on the back-end channel (any
    thread; False when it could not go). :attr:`iotlb` exists while
    VIRTIO_F_ACCESS_PLATFORM is acked (SET_FEATURES), else None."""

    def __init__(self, device: Device, rings: Vrings, send_miss: Callable[[int, int], bool],
                 logger: logging.Logger, conn_id: int = 0):
        self.device = device
        self.rings = rings
        self.send_miss = send_miss
        self.logger = logger
        self.id = conn_id
        self.iotlb: Iotlb | None = None
        #: vring index -> (iova, perm, time.monotonic() of the first miss) of a ring area that misses.
        self.ring_misses: dict[int, tuple[int, int, float]] = {}
        #: vring index -> why its ring areas cannot be used (an entry refuses the access).
        self.ring_refused: dict[int, str] = {}
        self.ring_restarts = 0

    # --- features / memory ---------------------------------------------------------------
    def set_features(self, features: int, mem) -> None:
        """SET_FEATURES: an IOTLB from now on when VIRTIO_F_ACCESS_PLATFORM
        is acked (kept across a second SET_FEATURES with it), none without."""
        if has_feature(features, VIRTIO_F_ACCESS_PLATFORM):
            if self.iotlb is None:
                self.iotlb = Iotlb(miss_sink=self.send_miss)
                self.iotlb.set_memory(mem)
                self.rings.translate = self.translate
        elif self.iotlb is not None:
            self._drop()
        self.device.iotlb = self.iotlb

    def set_memory(self, mem) -> None:
        """A new memory table (every vring stopped): the IOTLB is flushed,
        its host pointers went with the old mappings."""
        if self.iotlb is not None:
            self.iotlb.set_memory(mem)

    def _drop(self) -> None:
        self.rings.translate = None
        self.iotlb.close()
        self.iotlb = None
        self.ring_misses.clear()
        self.ring_refused.clear()

    def close(self) -> None:
        """After every vring stopped."""
        if self.iotlb is not None:
            self._drop()

    # --- ring addresses ---------------------------------------------------------------------
    def translate(self, v: VringConfig) -> VringConfig | None:
        """Vrings' translator: a copy of ``v`` with the three ring IOVAs
        replaced by front-end addresses, or None: when one misses (the miss
        is sent; the vring starts once an UPDATE covers it), or when an
        entry refuses the device's access or the area is not contiguous
        (the vring is refused: :meth:`_refuse_ring`)."""
        out = {}
        for fld, what, perm, size in ring_areas(v):
            iova = getattr(v, fld)
            try:
                out[fld] = self.iotlb.translate(iova, size, perm, f"vring {v.index} {what} ring")
            except IotlbMiss as m:
                first = self.ring_misses.get(v.index)
                since = first[2] if first and first[:2] == (m.iova, m.perm) else time.monotonic()
                self.ring_misses[v.index] = (m.iova, m.perm, since)
                self.iotlb.ask(m.iova, m.perm)
                return None
            except IotlbRejected as e:
                self._refuse_ring(v, f"vring {v.index}: {e}")
                return None
        self.ring_misses.pop(v.index, None)
        self.ring_refused.pop(v.index, None)
        return dataclasses.replace(v, **out)

    def _refuse_ring(self, v: VringConfig, reason: str) -> None:
        """A ring area's entry refuses the device's access (a used ring
        mapped read-only...): the vring does not start, as a queue broken
        by a refused buffer access stops (one log line, SET_VRING_ERR; the
        snapshot's queue_broken), until the front-end maps it right."""
        self.ring_misses.pop(v.index, None)
        if self.ring_refused.get(v.index) == reason:
            return
        self.ring_refused[v.index] = reason
        self.logger.warning("connection %d: %s; the vring does not start", self.id, reason)
        if v.err_fd is not None:
            try:
                os.eventfd_write(v.err_fd, 1)
            except OSError:
                pass

    def retry(self) -> None:
        """Ask again for the ring areas that still miss (the server's timer,
        every second; Iotlb.ask sends at most one per page and second): a
        front-end that lost the first miss is not left waiting for ever."""
        if self.iotlb is not None:
            for iova, perm, _ in list(self.ring_misses.values()):
                self.iotlb.ask(iova, perm)

    # --- IOTLB_MSG ----------------------------------------------------------------------------
    def handle(self, msg: Message, m: IotlbMsg) -> None:
        """IOTLB_MSG: UPDATE or INVALIDATE; RequestRefused (one log line,
        REPLY_ACK 1, nothing changed) for anything the IOTLB refuses."""
        if self.iotlb is None:
            raise RequestRefused(f"{msg.name}: VIRTIO_F_ACCESS_PLATFORM (bit {VIRTIO_F_ACCESS_PLATFORM}) was not "
                                 f"negotiated: there is no IOTLB; message ignored")
        if isinstance(m, MalformedIotlbMsg):
            self.iotlb.rejected += 1
            raise RequestRefused(f"{msg.name}: size={m.size}: a struct vhost_iotlb_msg is "
                                 f"{VHOST_IOTLB_MSG_STRUCT.size} bytes; message ignored")
        try:
            if m.type == VHOST_IOTLB_UPDATE:
                if self.iotlb.update(m.iova, m.size, m.uaddr, m.perm):
                    self.logger.debug("connection %d: IOTLB update %#x+%#x -> %#x (%s)", self.id, m.iova,
                                      m.size, m.uaddr, access_name(m.perm))
                    if self.ring_misses:
                        self.rings.start_all(msg.name)
            elif m.type == VHOST_IOTLB_INVALIDATE:
                dropped, clamped = self.iotlb.invalidate(m.iova, m.size)
                if clamped:
                    self.iotlb.rejected += 1
                    self.logger.warning("connection %d: %s: INVALIDATE iova=%#x size=%#x: %s; read as "
                                        "%#x to the end of the IOVA space (%d entr%s dropped)", self.id,
                                        msg.name, m.iova, m.size,
                                        "size 0" if m.size == 0 else "iova + size runs past 2^64", m.iova,
                                        dropped, "y" if dropped == 1 else "ies")
                else:
                    self.logger.debug("connection %d: IOTLB invalidate %#x+%#x: %d entr%s dropped", self.id,
                                      m.iova, m.size, dropped, "y" if dropped == 1 else "ies")
                self._restart_rings_in(msg.name, m.iova,
                                       (1 << 64) - m.iova if clamped else m.size)
            else:
                raise IotlbRejected("type", m.type, "the front-end sends only VHOST_IOTLB_UPDATE (2) and "
                                                    "VHOST_IOTLB_INVALIDATE (3)")
        except IotlbRejected as e:
            if e.field == "type":
                self.iotlb.rejected += 1
            raise RequestRefused(f"{msg.name}: {e}; message ignored") from None

    def _restart_rings_in(self, name: str, iova: int, size: int) -> None:
        """Stop every started vring with a ring area in ``[iova, iova +
        size)`` (the device used host pointers translated before) and start
        it again through the IOTLB: it misses, and waits for the UPDATE."""
        for v in self.rings.configs:
            if not v.started:
                continue
            if any(getattr(v, fld) < iova + size and iova < getattr(v, fld) + n
                   for fld, _, _, n in ring_areas(v)):
                self.logger.info("connection %d: vring %d: an IOTLB invalidation took its ring areas; "
                                 "restarting it through the IOTLB", self.id, v.index)
                self.ring_restarts += 1
                self.rings.stop(v.index)
                self.rings.maybe_start(name, v.index)

    # --- snapshot ---------------------------------------------------------------------------------
    def snapshot_extras(self, v: VringConfig, mem, queue_miss: dict | None) -> dict:
        """The queue's ``iotlb`` extras (:func:`iotlb_extras`) with the
        vring restarts and what the queue waits for (``miss``: ``iova``,
        ``perm``, ``waiting_s``; None): a ring area that missed at start, or
        the data path's ``queue_miss`` (QueueStats.iotlb_miss)."""
        out = iotlb_extras(self.iotlb, v, mem)
        out["ring_restarts"] = self.ring_restarts
        out["ring_refused"] = self.ring_refused.get(v.index)
        rm = self.ring_misses.get(v.index)
        if rm is not None:
            out["miss"] = {"iova": rm[0], "perm": access_name(rm[1]), "waiting_s": time.monotonic() - rm[2]}
        elif queue_miss is not None:
            out["miss"] = {"iova": queue_miss["iova"], "perm": access_name(queue_miss["perm"]),
                           "waiting_s": queue_miss.get("waiting_s")}
        return out


def iotlb_extras(t: Iotlb, v: VringConfig, mem) -> dict:
    """A queue's ``iotlb`` snapshot extras over IOTLB ``t`` (a back-end's, or
    a proxy's mirror): its counters (Iotlb.stats) and, under ``ring``, each
    ring area's IOVA with its front-end address ``uaddr`` and guest-physical
    ``gpa`` in ``mem`` (both None where it does not translate); ``miss``
    None."""
    out: dict = dict(t.stats())
    ring = {}
    for fld, what, perm, size in ring_areas(v):
        iova = getattr(v, fld)
        uaddr = gpa = None
        try:
            uaddr = t.translate(iova, size, perm, what)
            gpa = mem.uva_to_gpa(uaddr, size) if mem is not None else None
        except (IotlbMiss, IotlbRejected, MemoryAccessError):
            pass
        ring[what] = {"iova": iova, "uaddr": uaddr, "gpa": gpa}
    out["ring"] = ring
    out["miss"] = None
    return out


__all__ = ["IotlbControl", "PACKED_RING_AREAS", "RING_AREAS", "iotlb_extras", "ring_areas"]
