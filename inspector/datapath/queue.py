"""The device side of a split virtqueue (VIRTIO 1.2 §2.7), C-backed
(csrc/vqd_vq.c): :class:`DeviceQueue` pops available chains, maps their
buffers, pushes used entries and decides calls (``vring_need_event``,
§2.7.10), and logs kicks and calls with their times (csrc/vqd_evlog.c).
:class:`QueueBase` holds what every layout shares (counters, faults, the
event log, copies); the packed ring's sibling is
:class:`~inspector.datapath.packed_queue.PackedDeviceQueue`.

Objects here hold raw pointers into guest memory: keep the GuestMemory
buffers alive (they do) and call ``release()`` before unmapping. Every entry
point that touches guest memory runs under the SIGBUS guard
(inspector/_cffi.py). C returns counts or negative ``VQD_E_*`` statuses;
:func:`inspector._cffi.check` turns them into RingError (a broken queue,
with C's reason) or ArgumentError.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._cffi import check, ffi, install_sigbus_guard, lib
from ..errors import MemoryAccessError
from ..events import EVENT_KIND_CODES, EVENT_RECORD, decode_events
from ..layout import avail_ring_size, desc_table_size, used_ring_size

#: Default capacity of a queue's event log (entries, a power of two).
EVENT_LOG_DEFAULT = lib.VQD_EVLOG_DEFAULT

#: :attr:`DeviceQueue.fault` bits (csrc/vqd_vq.h VQD_FAULT_*).
FAULT_STALL = lib.VQD_FAULT_STALL
FAULT_DROP_CALLS = lib.VQD_FAULT_DROP_CALLS

# The records' kind codes are the C log's (VQD_EV_*); inspector.events
# decodes them without importing C, so the two must agree.
if EVENT_KIND_CODES != {"kick": lib.VQD_EV_KICK, "call": lib.VQD_EV_CALL,
                        "call_suppressed": lib.VQD_EV_CALL_SUPPRESSED}:
    raise ImportError("inspector.events.EVENT_KIND_CODES differ from the C log's VQD_EV_* codes")


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event`` (§2.7.10): true when ``event_idx`` lies in
    ``[old_idx, new_idx)`` modulo 2^16."""
    return bool(lib.vqd_need_event(event_idx & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF))


class RegionTable:
    """``struct vqd_region[]`` over a GuestMemory's buffers (zero copy).

    Holds buffer exports (``ffi.from_buffer``) of every region: call
    :meth:`release` once no C code uses the pointers, or an ``mmap`` cannot be
    closed."""

    def __init__(self, mem):
        self.mem = mem
        regions = list(mem)
        self._bufs = []
        self.count = len(regions)
        self.array = ffi.new("struct vqd_region[]", max(1, self.count))
        for i, r in enumerate(regions):
            cbuf = ffi.from_buffer("uint8_t[]", r.buf, require_writable=True)
            self._bufs.append(cbuf)
            if r.buf_offset < 0 or r.buf_offset + r.size > len(cbuf):
                raise MemoryAccessError(
                    f"region gpa {r.gpa:#x}+{r.size:#x} needs {r.buf_offset + r.size} bytes of "
                    f"its buffer, which has {len(cbuf)}")
            self.array[i].gpa = r.gpa
            self.array[i].size = r.size
            self.array[i].host = cbuf + r.buf_offset

    def host(self, gpa: int, size: int):
        """``uint8_t *`` for ``[gpa, gpa+size)``, which must lie in one region."""
        for i in range(self.count):
            r = self.array[i]
            if r.gpa <= gpa < r.gpa + r.size:
                if gpa + size > r.gpa + r.size:
                    raise MemoryAccessError(
                        f"ring area {gpa:#x}+{size:#x} runs past the end of region "
                        f"{r.gpa:#x}+{r.size:#x}")
                return r.host + (gpa - r.gpa)
        raise MemoryAccessError(f"ring area at guest-physical {gpa:#x} is outside every region")

    def release(self) -> None:
        for b in self._bufs:
            ffi.release(b)
        self._bufs = []
        self.count = 0


@dataclass
class Chain:
    """A popped chain: ``head`` (split: the head descriptor's index; packed:
    the buffer id), ``out`` device-readable and ``in_`` device-writable views
    into guest memory (one per region piece)."""

    head: int
    out: list
    in_: list
    out_len: int
    in_len: int
    #: Ring slots the chain took (packed rings, §2.8.6: next_used skips them); 1 for split.
    ndescs: int = 1


class QueueBase:
    """What a device-serviced ring has whatever its layout (``struct vqd_vq``
    in C): the region table, counters, faults, the broken reason, copies
    into and out of popped chains, the kick eventfd and the event log. The
    layouts' classes (:class:`DeviceQueue` here, split; PackedDeviceQueue in
    :mod:`.packed_queue`) add the ring's own operations.

    ``event_capacity`` > 0 gives the queue an event log of that many entries
    (a power of two): every kick read, call written and call suppressed is
    recorded with its CLOCK_REALTIME time by the thread servicing the queue;
    :meth:`drain_events` (one thread at a time) takes them out. 0: no log.

    ``reject_zero_len``: a descriptor of length 0 breaks the queue (QEMU's
    virtqueue_map_desc refuses zero-sized buffers the same way; the spec does
    not forbid them, so the library default accepts them and maps nothing).
    """

    #: "split" or "packed" (the snapshot's ``layout``).
    layout = "split"

    def _setup(self, mem, num: int, regions: RegionTable | None) -> None:
        """Before the layout's init: the SIGBUS guard, the region table, an
        empty ``struct vqd_vq``."""
        install_sigbus_guard()
        self.num = num
        self.regions = regions if regions is not None else RegionTable(mem)
        self._own_regions = regions is None
        self._elems = None
        self._iov = None
        self.vq = ffi.new("struct vqd_vq *")

    def _finish(self, event_capacity: int, reject_zero_len: bool) -> None:
        """After the layout's init: the zero-length rule and the event log."""
        self.vq.reject_zero_len = 1 if reject_zero_len else 0
        self.event_capacity = event_capacity
        if event_capacity:
            self._evlog = ffi.new("struct vqd_evlog *")
            self._evbuf = ffi.new("struct vqd_event[]", event_capacity)
            check(lib.vqd_evlog_init(self._evlog, self._evbuf, event_capacity),
                  f"event_capacity {event_capacity} (give a power of two)")
            self.vq.evlog = self._evlog

    # --- VIRTIO_F_ACCESS_PLATFORM ------------------------------------------------
    #: The datapath.iotlb.Iotlb buffer addresses go through (None: guest-physical).
    iotlb = None

    def attach_iotlb(self, iotlb) -> None:
        """From now on every buffer address is an IOVA translated through
        ``iotlb`` (a datapath.iotlb.Iotlb, kept alive by this queue); a
        chain meeting a miss stays in the ring (:meth:`take_miss`)."""
        self.iotlb = iotlb
        self.vq.iotlb = iotlb.ptr

    def take_miss(self) -> tuple[int, int] | None:
        """The IOTLB miss met since the last call, ``(iova, perm)``, or None.
        Only the thread servicing the queue calls it."""
        v = self.vq
        if not v.miss_new:
            return None
        v.miss_new = 0
        return v.miss_iova, v.miss_perm

    @property
    def iotlb_waiting(self) -> bool:
        """A chain waits for an IOTLB UPDATE: the last miss came after the
        last UPDATE."""
        return bool(lib.vqd_vq_iotlb_waiting(self.vq))

    @property
    def iotlb_miss(self) -> dict | None:
        """What the queue waits for (``iova``, ``perm`` VHOST_ACCESS_*) while
        :attr:`iotlb_waiting`, else None (for the snapshot)."""
        v = self.vq
        if not self.iotlb_waiting:
            return None
        return {"iova": v.miss_iova, "perm": v.miss_perm, "misses": v.iotlb_misses}

    # --- state --------------------------------------------------------------
    @property
    def broken(self) -> str | None:
        if not self.vq.broken:
            return None
        return ffi.string(self.vq.reason).decode(errors="replace")

    @property
    def counters(self) -> dict:
        """Cumulative counts: ``kicks`` read, ``calls`` written,
        ``calls_suppressed`` by the driver (§2.7.10), ``packets`` and
        ``bytes`` (frames), ``drops`` (frames lost: on a receive queue for
        want of a buffer, a buffer too small, or a stall), ``calls_dropped``
        (due but lost on purpose: :attr:`fault`)."""
        v = self.vq
        return {"kicks": v.kicks, "calls": v.calls, "calls_suppressed": v.calls_suppressed,
                "packets": v.packets, "bytes": v.bytes, "drops": v.drops,
                "calls_dropped": v.calls_dropped}

    @property
    def fault(self) -> int:
        """Faults on purpose now in force (inspector/faults.py): a mask of
        :data:`FAULT_STALL` (pop nothing: the device stopped serving the
        vring) and :data:`FAULT_DROP_CALLS` (a due call is lost). Set it only
        from the thread that services the queue."""
        return self.vq.fault

    @fault.setter
    def fault(self, mask: int) -> None:
        self.vq.fault = mask

    # --- operations -----------------------------------------------------------
    def _pop(self, c_pop, max_chains: int, max_iov: int) -> list[Chain]:
        """Pop with the layout's C pop ``c_pop`` (see the layouts' ``pop``)."""
        if self._elems is None or len(self._elems) < max_chains or len(self._iov) < max_iov:
            self._elems = ffi.new("struct vqd_elem[]", max_chains)
            self._iov = ffi.new("struct vqd_iov[]", max_iov)
        n = check(c_pop(self.vq, self._elems, max_chains, self._iov, max_iov), "pop", self.broken)
        out = []
        for k in range(n):
            e = self._elems[k]
            views = [memoryview(ffi.buffer(self._iov[j].base, self._iov[j].len))
                     for j in range(e.iov_idx, e.iov_idx + e.out_num + e.in_num)]
            out.append(Chain(e.head, views[:e.out_num], views[e.out_num:], e.out_len, e.in_len,
                             max(e.ndescs, 1)))
        return out

    def _copy(self, views: list, buf, length: int, to_guest: bool) -> int:
        if not views:
            return 0
        iov = ffi.new("struct vqd_iov[]", len(views))
        keep = []
        for i, v in enumerate(views):
            p = ffi.from_buffer("uint8_t[]", v, require_writable=to_guest)
            keep.append(p)
            iov[i].base, iov[i].len = p, len(v)
        return check(lib.vqd_vq_copy_iov(self.vq, iov, len(views), buf, length,
                                         1 if to_guest else 0), "copy", self.broken)

    def read(self, chain: Chain, max_bytes: int | None = None) -> bytes:
        """The chain's device-readable bytes (its ``out`` buffers in order,
        at most ``max_bytes``), copied in C under the SIGBUS guard. Raises
        RingError, and the queue is broken naming the guest-physical address,
        when the front-end truncated the memory behind them."""
        n = chain.out_len if max_bytes is None else min(max_bytes, chain.out_len)
        buf = ffi.new("uint8_t[]", max(n, 1))
        got = self._copy(chain.out, buf, n, False)
        return bytes(ffi.buffer(buf, got))

    def write(self, chain: Chain, data: bytes) -> int:
        """Copy ``data`` into the chain's device-writable buffers (its
        ``in_`` views in order) under the SIGBUS guard; returns the bytes
        written (at most the chain's ``in_len``; the caller reports it in
        :meth:`push`). Errors as :meth:`read`."""
        src = ffi.from_buffer("uint8_t[]", data)
        return self._copy(chain.in_, src, min(len(data), chain.in_len), True)

    def drain_kick(self) -> int:
        """Read the kick eventfd (non-blocking) and count its kicks; returns
        how many were coalesced in it (0: none)."""
        return check(lib.vqd_vq_drain_kick(self.vq), "drain_kick", self.broken)

    # --- event log ------------------------------------------------------------
    def drain_event_records(self) -> bytearray:
        """Take the logged events out, oldest first, as packed
        :data:`EVENT_RECORD` s (one copy, no per-event work: the server
        drains often and decodes only what a client asks for). Safe while
        the worker runs; one caller at a time."""
        n = check(lib.vqd_vq_events_pending(self.vq), "events_pending")
        out = bytearray(EVENT_RECORD.size * n)
        if n:
            got = check(lib.vqd_vq_drain_events(
                self.vq, ffi.from_buffer("struct vqd_event[]", out, require_writable=True), n),
                "drain_events")
            del out[EVENT_RECORD.size * got:]
        return out

    def drain_events(self) -> list[tuple[int, str, int]]:
        """Take the logged events out, oldest first: ``(time_ns, kind,
        value)`` with ``kind`` "kick" (value: kicks coalesced), "call" or
        "call_suppressed" (value: used_idx then); see inspector/events.py."""
        return decode_events(self.drain_event_records())

    @property
    def events_dropped(self) -> int:
        """Events lost because the log was full (cumulative)."""
        return lib.vqd_vq_events_dropped(self.vq)

    def release(self) -> None:
        """Drop the buffer exports (only when no thread is in C with this queue)."""
        if self._own_regions:
            self.regions.release()


class DeviceQueue(QueueBase):
    """One split ring serviced by the device (``struct vqd_vq``, csrc/vqd_vq.c).

    Ring addresses are front-end virtual addresses (vhost-user
    SET_VRING_ADDR) unless ``gpa=True``; they are translated through ``mem``.
    Fds are borrowed: the caller keeps them open while the queue is used.
    ``event_capacity`` and ``reject_zero_len``: :class:`QueueBase`.

    Raises RingError when the ring cannot be used (its reason: size,
    alignment, or a SIGBUS reading used->idx), MemoryAccessError when an area
    is outside ``mem``, ArgumentError when ``event_capacity`` is not a power
    of two."""

    def __init__(self, mem, num: int, desc: int, avail: int, used: int, *,
                 last_avail_idx: int = 0, event_idx: bool = False,
                 call_fd: int = -1, kick_fd: int = -1, gpa: bool = False,
                 regions: RegionTable | None = None, event_capacity: int = 0,
                 reject_zero_len: bool = False):
        self._setup(mem, num, regions)
        try:
            if not gpa:
                desc = mem.uva_to_gpa(desc, desc_table_size(num))
                avail = mem.uva_to_gpa(avail, avail_ring_size(num))
                used = mem.uva_to_gpa(used, used_ring_size(num))
            rc = lib.vqd_vq_init(
                self.vq, num, self.regions.host(desc, 16 * num),
                self.regions.host(avail, avail_ring_size(num)),
                self.regions.host(used, used_ring_size(num)),
                self.regions.array, self.regions.count, last_avail_idx & 0xFFFF,
                1 if event_idx else 0, call_fd, kick_fd)
            check(rc, "vring init", self.broken)
        except BaseException:
            self.release()  # the buffer exports would keep the mappings open
            raise
        self._finish(event_capacity, reject_zero_len)

    # --- state --------------------------------------------------------------
    @property
    def last_avail_idx(self) -> int:
        return self.vq.last_avail_idx

    @property
    def used_idx(self) -> int:
        return self.vq.used_idx

    @property
    def shadow_avail_idx(self) -> int:
        """``avail->idx`` as the device last read it (16 bits)."""
        return self.vq.shadow_avail_idx

    @property
    def vhost_base(self) -> int:
        """The ring's vhost-user GET_VRING_BASE value: last_avail_idx."""
        return self.vq.last_avail_idx

    # --- operations -----------------------------------------------------------
    def avail_count(self) -> int:
        return check(lib.vqd_vq_avail_count(self.vq), "avail", self.broken)

    def pop(self, max_chains: int = 64, max_iov: int = 1024) -> list[Chain]:
        """Pop up to ``max_chains`` available chains (raises RingError when
        the queue is broken and nothing could be popped).

        The chains' views map guest memory directly: touching them from
        Python is not guarded against a front-end that truncates its memory
        after SET_MEM_TABLE (SIGBUS kills the process). Code serving a
        front-end it does not trust copies with :meth:`read` and
        :meth:`write`, which are."""
        return self._pop(lib.vqd_vq_pop, max_chains, max_iov)

    def rewind(self, n: int) -> None:
        """Give back the last ``n`` popped chains not yet pushed (libvhost-user's
        vu_queue_rewind): the next pops return them again."""
        check(lib.vqd_vq_rewind(self.vq, n), "rewind", self.broken)

    def push(self, used: list[tuple[int, int]]) -> int:
        """Return chains as used ``(head, len)`` and publish used->idx."""
        heads = ffi.new("uint32_t[]", [h for h, _ in used] or [0])
        lens = ffi.new("uint32_t[]", [n for _, n in used] or [0])
        return check(lib.vqd_vq_push(self.vq, heads, lens, len(used)), "push", self.broken)

    def should_notify(self) -> bool:
        """Does the driver want a used buffer notification now (§2.7.10;
        updates the device's signalled_used)? Raises RingError when reading
        the ring faulted (the queue is then broken)."""
        return bool(check(lib.vqd_vq_should_notify(self.vq), "should_notify", self.broken))

    def notify(self) -> bool:
        """Write the call eventfd if the driver wants it; True if called."""
        return bool(check(lib.vqd_vq_notify(self.vq), "notify", self.broken))

    def set_notification(self, enable: bool) -> int:
        """Enable/disable kicks; after enabling returns entries already available."""
        return check(lib.vqd_vq_set_notification(self.vq, 1 if enable else 0),
                     "set_notification", self.broken)

    def notice(self) -> int:
        """What a kicked device that cannot work does (a stalled queue):
        read ``avail->idx`` (:attr:`shadow_avail_idx` moves) and ask for a
        kick at the next entry published after it (``avail_event`` = that
        index with EVENT_IDX, as Linux ``vhost_enable_notify``; else
        VRING_USED_F_NO_NOTIFY clear; §2.7.10). Returns the entries
        available beyond ``last_avail_idx``; RingError when avail->idx is
        more than a queue size ahead (§2.7.6)."""
        return check(lib.vqd_vq_notice(self.vq), "notice", self.broken)
