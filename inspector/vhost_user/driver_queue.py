"""The driver side of a vhost-user front-end's vrings, whatever the device:
one :class:`DriverQueue` per vring (its split or packed driver ring, kick
and call eventfds, counters, driver faults) and :class:`QueueDriver`, the
operations every virtio driver does on them: publish and kick honouring
notification suppression (VIRTIO 1.2 §2.7.10, §2.7.13.4, §2.8.10), collect
used buffers re-arming calls (§2.7.7, Linux virtqueue_enable_cb_prepare),
wait for calls, and the driver faults of inspector/faults.py
(``withhold-kicks``, ``stop-consuming``).

The device drivers build on it: :class:`~.net_driver.VirtioNetDriver`
(virtio-net) and :class:`~.blk_frontend.BlkFrontend` (virtio-blk).
"""

from __future__ import annotations

import os
import select
import time

from ..errors import ArgumentError
from ..faults import DRIVER_FAULTS, Fault, check_vrings
from ..ring.driver import DriverRing
from ..ring.driver_packed import PackedDriverRing
from ..spec.virtio import VIRTIO_RING_F_EVENT_IDX, VRING_USED_F_NO_NOTIFY, has_feature, vring_need_event


class DriverQueue:
    """The front-end's state of one vring: ``kicks`` written, ``calls``
    read, ``kicks_withheld`` (due but not written: ``withhold-kicks``), its
    driver ``faults`` and when it ``started`` (time.monotonic(), set at each
    vring set-up: faults count from there)."""

    def __init__(self, index: int, ring: DriverRing | PackedDriverRing, kick_fd: int, call_fd: int):
        self.index = index
        self.ring = ring
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.slots: dict[int, int] = {}  # head (split) or buffer id (packed) -> frame slot
        self.kicks = 0
        self.calls = 0
        self.kicks_withheld = 0
        # At the last kick decision: avail idx (split), descriptors published (packed).
        self.last_kick_idx = 0

        self.faults: tuple[Fault, ...] = ()
        self.started = time.monotonic()

    @property
    def packed(self) -> bool:
        return isinstance(self.ring, PackedDriverRing)

    def fault_on(self, kind: str) -> bool:
        """Is a fault of ``kind`` in force on this vring now?"""
        if not self.faults:
            return False
        elapsed = time.monotonic() - self.started
        return any(f.kind == kind and f.active(elapsed) for f in self.faults)


class QueueDriver:
    """Driver operations on ``self.queues`` (one :class:`DriverQueue` per
    vring, index = vring number) given the negotiated ``self.features`` and
    ``self.num_vrings``: a mixin of the front-end, which owns both."""

    @property
    def event_idx(self) -> bool:
        return has_feature(self.features, VIRTIO_RING_F_EVENT_IDX)

    def set_faults(self, faults) -> None:
        """Driver faults on purpose (inspector/faults.py: ``withhold-kicks``,
        ``stop-consuming``), each counted from the set-up of its vring.
        Replaces those set before. ArgumentError for a device fault or a
        vring this front-end does not have."""
        faults = tuple(faults)
        for f in faults:
            if f.kind not in DRIVER_FAULTS:
                raise ArgumentError(f"fault {str(f)!r}: {f.kind} is not a driver fault (use one of "
                                    f"{', '.join(DRIVER_FAULTS)})")
        check_vrings(faults, self.num_vrings, f"this front-end ({self.num_vrings} vring(s))")
        self.faults = faults
        for q in self.queues:
            q.faults = tuple(f for f in faults if f.vring == q.index)

    def kick(self, q: DriverQueue) -> bool:
        """Notify the device if it asked for it: split (VIRTIO 1.2
        §2.7.13.4) VRING_USED_F_NO_NOTIFY, or with EVENT_IDX the avail_event
        window; packed (§2.8.10) the device event suppression area.
        Returns whether a kick was sent. Under ``withhold-kicks`` a due kick
        is not written (counted in ``kicks_withheld``) and the window is kept
        from the last kick written, so that the first publish after the
        fault kicks if any kick was due meanwhile."""
        ring = q.ring
        if q.packed:
            new = ring.published
            need = ring.need_kick(q.last_kick_idx, self.event_idx)
        elif self.event_idx:
            new = ring.avail_idx
            need = vring_need_event(ring.avail_event, new, q.last_kick_idx)
        else:
            new = ring.avail_idx
            need = not ring.used_flags & VRING_USED_F_NO_NOTIFY
        if need and q.fault_on("withhold-kicks"):
            q.kicks_withheld += 1
            return False
        q.last_kick_idx = new
        if need:
            os.eventfd_write(q.kick_fd, 1)
            q.kicks += 1
        return need

    def publish(self, index: int, force_kick: bool = False) -> None:
        """Publish what was added to vring ``index`` (avail->idx) and kick if
        the device asked for it, or always with ``force_kick``."""
        q = self.queues[index]
        q.ring.publish()
        if not self.kick(q) and force_kick:
            os.eventfd_write(q.kick_fd, 1)
            q.kicks += 1

    def _collect(self, q: DriverQueue) -> list[tuple[int, int, int]]:
        """Used entries as (head or buffer id, len, slot); frees
        descriptors, re-arms used_event (split) or the driver event
        suppression's DESC position (packed). Nothing under
        ``stop-consuming`` (both stay)."""
        if q.fault_on("stop-consuming"):
            return []
        out = []
        ring = q.ring
        while True:
            for head, length in ring.get_used():
                out.append((head, length, q.slots.pop(head)))
            if not self.event_idx:
                return out
            # Linux virtqueue_enable_cb_prepare + virtqueue_poll: ask for a call
            # at the next entry, then look again: one used meanwhile may have
            # been checked against the old event position (no call for it).
            if q.packed:
                ring.enable_calls(event_idx=True)
                if not ring.has_used():
                    return out
                continue
            ring.used_event = ring.last_used_idx
            if ring.used_idx == ring.last_used_idx:
                return out

    def _backend_fd_to_serve(self) -> int | None:
        """An fd :meth:`wait_calls` also polls, and :meth:`serve_misses` is
        called when it is readable (the IOMMU front-end's back-end channel);
        None: none."""
        return None

    def serve_misses(self, timeout: float = 0.0) -> int:
        """Answer what the back-end asked on :meth:`_backend_fd_to_serve`
        (the IOMMU front-end's IOTLB misses); nothing here."""
        return 0

    def wait_calls(self, qs: list[DriverQueue], timeout: float = 1.0) -> list[DriverQueue]:
        """Wait up to ``timeout`` s for a call on any of ``qs``; drain their
        eventfds and return those that had one (empty: none came). A vring
        under ``stop-consuming`` is not listened to (its calls stay unread).
        Behind an IOMMU the back-end's IOTLB misses are answered meanwhile
        (a miss answered ends the wait early, with the calls that came)."""
        qs = [q for q in qs if not q.fault_on("stop-consuming")]
        backend_fd = self._backend_fd_to_serve()
        if not qs and backend_fd is None:
            time.sleep(max(0, timeout))
            return []
        poller = select.poll()
        for q in qs:
            poller.register(q.call_fd, select.POLLIN)
        if backend_fd is not None:
            poller.register(backend_fd, select.POLLIN)
        ready = poller.poll(max(0, timeout) * 1000)
        if not ready:
            return []
        if backend_fd is not None and any(fd == backend_fd for fd, _ in ready):
            self.serve_misses(0)
        got = []
        for q in qs:
            try:
                os.eventfd_read(q.call_fd)
                q.calls += 1
                got.append(q)
            except BlockingIOError:
                pass
        return got
