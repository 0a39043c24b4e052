"""What every device's data path threads share about a started vring
(inspector/devices/net.py and blk.py): :class:`StartedRing`, a started vring
(its C queue, dup'ed fds, faults on purpose, start time); :class:`RingTable`,
a device's started rings and what the retired ones left behind (counters,
broken reasons, vring bases, undrained events; the inflight area's
tracking); :class:`RingWorker`, the thread that services rings and its
wake eventfd; and :func:`report_broken`, what a worker does when its rings
break.

A device holds its own lock around every RingTable call; the table itself is
not thread-safe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from ..datapath.inflight import InflightAreas
from ..datapath.packed_queue import PackedDeviceQueue, decode_vring_base
from ..datapath.queue import FAULT_DROP_CALLS, FAULT_STALL, DeviceQueue
from ..errors import RingError
from ..events import EVENT_RECORD
from ..faults import Fault
from ..memory import GuestMemory
from .base import QueueStats, VringConfig

#: DeviceQueue.fault bit of each device fault the C queue makes (the others,
#: e.g. blk's hold-io, are the device's own).
FAULT_BITS = {"stall": FAULT_STALL, "drop-calls": FAULT_DROP_CALLS}


def fault_bits(kinds) -> int:
    """The DeviceQueue.fault mask of the fault ``kinds`` in force."""
    mask = 0
    for k in kinds:
        mask |= FAULT_BITS.get(k, 0)
    return mask


def dup_fd(fd: int | None, nonblocking: bool = False) -> int:
    """A dup of ``fd`` (ours to close), or -1 for None / negative."""
    if fd is None or fd < 0:
        return -1
    d = os.dup(fd)
    if nonblocking:
        os.set_blocking(d, False)
    return d


class StartedRing:
    """A started vring: the C queue ``q`` (DeviceQueue, or PackedDeviceQueue
    when ``vring.packed``; ``in_order``: VIRTIO_F_IN_ORDER negotiated, which
    a packed ring uses to write one used descriptor per run of buffers,
    §2.8.8), the fds it keeps (dup'ed: ours), its ``faults`` and when it
    ``started`` (time.monotonic(): faults count from there).
    ``reject_zero_len``: a zero-length descriptor breaks the queue (QEMU's
    virtio-net and virtio-blk both refuse them). ``iotlb``: the
    connection's datapath.iotlb.Iotlb when VIRTIO_F_ACCESS_PLATFORM was
    negotiated (buffer addresses are IOVAs; the ring addresses in ``vring``
    were already translated)."""

    def __init__(self, vring: VringConfig, mem: GuestMemory, event_idx: bool, event_capacity: int,
                 faults: tuple[Fault, ...] = (), in_order: bool = False, reject_zero_len: bool = True,
                 iotlb=None):
        self.index = vring.index
        self.faults = faults
        self.started = time.monotonic()
        self.kick_fd = dup_fd(vring.kick_fd, nonblocking=True)
        self.call_fd = dup_fd(vring.call_fd)
        self.err_fd = dup_fd(vring.err_fd)
        try:
            common = dict(event_idx=event_idx, call_fd=self.call_fd, kick_fd=self.kick_fd,
                          event_capacity=event_capacity, reject_zero_len=reject_zero_len)
            if vring.packed:
                avail, avail_wrap, used, used_wrap = decode_vring_base(vring.base)
                self.q = PackedDeviceQueue(mem, vring.num, vring.desc_uva, vring.avail_uva, vring.used_uva,
                                           last_avail_idx=avail, avail_wrap_counter=avail_wrap,
                                           next_used=used, used_wrap_counter=used_wrap,
                                           in_order=in_order, **common)
            else:
                self.q = DeviceQueue(mem, vring.num, vring.desc_uva, vring.avail_uva, vring.used_uva,
                                     last_avail_idx=vring.base, **common)
            if iotlb is not None:
                self.q.attach_iotlb(iotlb)
        except BaseException:
            self._close_fds()
            raise
        self.reported_broken = False
        #: time.monotonic() since which the ring waits for an IOTLB UPDATE (RingWorker.iotlb_waiting).
        self.miss_since: float | None = None

    def active_faults(self, now: float) -> tuple[list[str], float | None]:
        """The kinds of this ring's faults in force at ``now``
        (time.monotonic()) and the seconds until that may change (None:
        never)."""
        elapsed, kinds, wake = now - self.started, [], None
        for f in self.faults:
            if f.active(elapsed) and f.kind not in kinds:
                kinds.append(f.kind)
            nxt = f.next_change(elapsed)
            if nxt is not None and (wake is None or nxt < wake):
                wake = nxt
        return kinds, wake

    def fault_mask(self, now: float) -> tuple[int, float | None]:
        """The DeviceQueue.fault mask the faults give at ``now`` and the
        seconds until it may change (None: never)."""
        kinds, wake = self.active_faults(now)
        return fault_bits(kinds), wake

    def signal_error(self) -> None:
        """vhost-user SET_VRING_ERR: tell the front-end this ring failed."""
        if self.err_fd >= 0:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass

    def _close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = self.err_fd = -1

    def close(self) -> None:
        self.q.release()
        self._close_fds()


class RingTable:
    """A device's started rings (``rings``: vring index -> StartedRing) and
    what each vring's retired rings left: counters summed over every start,
    why it broke, its vring base, events not drained yet. ``inflight``: the
    device's inflight areas (SET_INFLIGHT_FD), attached to each ring as it
    starts. ``event_capacity``: entries of each ring's event log (bounds the
    events a retired vring keeps: 4 logs' worth, the excess counted as
    dropped)."""

    def __init__(self, event_capacity: int):
        self.event_capacity = event_capacity
        self.rings: dict[int, StartedRing] = {}
        self.inflight = InflightAreas()
        self._totals: dict[int, dict[str, int]] = {}
        self._broken: dict[int, str] = {}
        self._last_avail: dict[int, int] = {}
        self._pending_events: dict[int, bytearray] = {}
        self._retired_dropped: dict[int, int] = {}

    def add(self, ring: StartedRing) -> int:
        """Install ``ring`` (retiring the one it replaces) and attach it to
        the inflight area; returns the heads the area hands back (0 without
        an area). On RingError from the area the ring stays installed,
        broken."""
        old = self.rings.pop(ring.index, None)
        if old is not None:
            self.retire(old)
        self.rings[ring.index] = ring
        return self.inflight.attach(ring.q, ring.index)

    def remove(self, index: int) -> int | None:
        """Retire vring ``index``'s ring; its vring base, or None when it
        was not started."""
        ring = self.rings.pop(index, None)
        return None if ring is None else self.retire(ring)

    def last_base(self, index: int) -> int:
        """The vring base vring ``index`` had when it last stopped (0: never)."""
        return self._last_avail.get(index, 0)

    def retire(self, ring: StartedRing) -> int:
        """Fold a ring's counters and undrained events into the vring's
        totals, hand the ring back asking for kicks and release it. Returns
        its vring base."""
        t = self._totals.setdefault(ring.index, {})
        for k, v in ring.q.counters.items():
            t[k] = t.get(k, 0) + v
        if ring.q.broken:
            self._broken[ring.index] = ring.q.broken
        pending = self._pending_events.setdefault(ring.index, bytearray())
        pending += ring.q.drain_event_records()
        lost = ring.q.events_dropped
        limit = 4 * max(self.event_capacity, 1) * EVENT_RECORD.size
        if len(pending) > limit:
            lost += (len(pending) - limit) // EVENT_RECORD.size
            del pending[:len(pending) - limit]
        self._retired_dropped[ring.index] = self._retired_dropped.get(ring.index, 0) + lost
        last = ring.q.vhost_base
        self._last_avail[ring.index] = last
        if not ring.q.broken:
            # Hand the ring back asking for kicks (NO_NOTIFY clear / avail_event
            # current), as a fresh ring is: whoever services it next gets them.
            try:
                ring.q.set_notification(True)
            except RingError:
                pass  # the ring broke on the way (e.g. SIGBUS: memory truncated); closed below
        ring.close()
        return last

    def counters(self, index: int) -> dict[str, int]:
        """The C queue counters of vring ``index`` summed over every start."""
        tot = dict(self._totals.get(index) or {})
        ring = self.rings.get(index)
        if ring is not None:
            for k, v in ring.q.counters.items():
                tot[k] = tot.get(k, 0) + v
        return tot

    def stats(self, index: int, faults=(), tot: dict[str, int] | None = None) -> QueueStats:
        """QueueStats of vring ``index`` with what every ring has: the
        notification and traffic counters (``tot``, default
        :meth:`counters`), the positions of a running ring, why it broke
        and, when the device sets ``faults`` on this vring, ``inject``
        (``faults``: their specs, ``active``: those in force now,
        ``calls_dropped``)."""
        tot = self.counters(index) if tot is None else tot
        ring = self.rings.get(index)
        st = QueueStats(kicks=tot.get("kicks", 0), calls=tot.get("calls", 0),
                        calls_suppressed=tot.get("calls_suppressed", 0),
                        packets=tot.get("packets", 0), bytes=tot.get("bytes", 0),
                        broken=self._broken.get(index))
        if ring is not None:
            q = ring.q
            st.last_avail_idx = q.last_avail_idx
            st.shadow_avail_idx = q.shadow_avail_idx
            st.broken = q.broken or st.broken
            if q.iotlb is not None:
                miss = q.iotlb_miss
                if miss is not None and ring.miss_since is not None:
                    miss["waiting_s"] = time.monotonic() - ring.miss_since
                st.iotlb_miss = miss
            if q.layout == "packed":
                st.last_avail_wrap_counter = q.avail_wrap_counter
                st.next_used, st.used_wrap_counter = q.next_used, q.used_wrap_counter
        if faults:
            now = time.monotonic()
            st.inject = {"faults": [str(f) for f in faults],
                         "active": [str(f) for f in faults if ring is not None and f.active(now - ring.started)],
                         "calls_dropped": tot.get("calls_dropped", 0)}
        return st

    def drain_events(self, index: int) -> tuple[bytearray, int]:
        """Device.drain_events for vring ``index``."""
        records = self._pending_events.pop(index, bytearray())
        dropped = self._retired_dropped.get(index, 0)
        ring = self.rings.get(index)
        if ring is not None:
            records += ring.q.drain_event_records()
            dropped += ring.q.events_dropped
        return records, dropped

    def close(self) -> None:
        """Retire every ring and release the inflight areas (workers stopped)."""
        for i in list(self.rings):
            self.retire(self.rings.pop(i))
        self.inflight.close()


class RingWorker(threading.Thread):
    """A device's data path thread (daemon, named ``name``) that sleeps on
    its rings and on ``_wake_fd``, an eventfd :meth:`stop` (and whatever
    else must wake it: :meth:`wake`) writes; it runs while ``_stopping`` is
    False.

    IOTLB misses (VIRTIO_F_ACCESS_PLATFORM): :meth:`iotlb_waiting` sends the
    misses its rings met to the front-end (datapath.iotlb.Iotlb.ask) and
    says which rings wait for an UPDATE; an UPDATE wakes the worker (it
    registers with the IOTLB of its rings)."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self._stopping = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._iotlbs: list = []

    def wake(self) -> None:
        """Wake the thread from its sleep (any thread; after stop() a no-op)."""
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def watch_iotlb(self, rings) -> None:
        """Be woken by UPDATEs of the IOTLB ``rings`` translate through."""
        for r in rings:
            t = r.q.iotlb if r is not None else None
            if t is not None and t not in self._iotlbs:
                t.add_waker(id(self), self.wake)
                self._iotlbs.append(t)

    def iotlb_waiting(self, rings) -> list:
        """Ask the front-end for the misses ``rings`` met; the rings whose
        next chain waits for an UPDATE."""
        waiting = []
        for r in rings:
            if r is None or r.q.iotlb is None:
                continue
            miss = r.q.take_miss()
            if miss is not None:
                r.q.iotlb.ask(*miss)
            if r.q.iotlb_waiting:
                waiting.append(r)
                if r.miss_since is None:
                    r.miss_since = time.monotonic()
            else:
                r.miss_since = None
        return waiting

    def stop(self) -> None:
        """Ask the thread to end, wake it, wait for it, close the eventfd."""
        self._stopping = True
        for t in self._iotlbs:
            t.remove_waker(id(self))
        self.wake()
        if self.is_alive() and self is not threading.current_thread():
            self.join()
        with self._wake_lock:
            os.close(self._wake_fd)
            self._wake_fd = -1


def report_broken(rings: list[StartedRing], what: str, error: Exception, log: logging.Logger,
                  hook: Callable[[str], None] | None) -> None:
    """A worker's rings broke (RingError ``error``): SET_VRING_ERR for each
    broken ring not reported yet, one log line naming ``what`` (e.g. "net
    pair 0") and the vrings, and the device's ``on_needs_reset`` ``hook``
    (DEVICE_NEEDS_RESET through the back-end core)."""
    broken = [r for r in rings if r is not None and r.q.broken]
    for r in broken:
        if not r.reported_broken:
            r.reported_broken = True
            r.signal_error()
    which = ", ".join(f"vring {r.index}" for r in broken) or "a vring"
    reason = broken[0].q.broken if broken else error
    log.error("%s: %s broken: %s; no longer serviced", what, which, reason)
    if hook is not None:
        try:
            hook(f"{what}: {reason}")
        except Exception:
            log.exception("%s: the needs-reset hook failed", what)


__all__ = ["FAULT_BITS", "fault_bits", "RingTable", "RingWorker", "StartedRing", "dup_fd", "report_broken"]
