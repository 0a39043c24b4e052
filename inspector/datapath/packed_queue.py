"""The device side of a packed virtqueue (VIRTIO 1.2 §2.8), C-backed
(csrc/vqd_pvq.c): :class:`PackedDeviceQueue`, the sibling of the split
:class:`~inspector.datapath.queue.DeviceQueue` with the same interface (pop,
read/write, push, rewind, notify, set_notification, notice, counters,
faults, the event log), so the net device and its workers serve either.

Positions are (slot, wrap counter) pairs (§2.8.1): the device's next slot to
read is ``last_avail_idx`` with ``avail_wrap_counter``; where it writes the
next used descriptor is ``next_used`` with ``used_wrap_counter``. vhost-user
carries both in one 32-bit SET/GET_VRING_BASE value (:func:`encode_vring_base`).

The driver and device event suppression areas (§2.8.10) replace the split
ring's flags and event indices; ``notify`` reads the driver's (ENABLE /
DISABLE / DESC with off and wrap) and ``set_notification`` writes ours.
Objects hold raw pointers into guest memory: call ``release()`` before
unmapping, as for DeviceQueue.
"""

from __future__ import annotations

from .._cffi import check, ffi, lib
from ..errors import ArgumentError
from ..spec.virtio import PVIRTQ_DESC_SIZE, PVIRTQ_EVENT_SUPPR_SIZE, VIRTQ_MAX_SIZE
from .queue import Chain, QueueBase, RegionTable

#: vhost-user SET/GET_VRING_BASE for packed rings (vhost-user spec "Vring
#: descriptor indices for packed virtqueues"): bits 0-14 last avail index,
#: bit 15 its wrap counter, bits 16-30 the used index, bit 31 its wrap counter.
_IDX_MASK = 0x7FFF
_WRAP_BIT = 1 << 15


def encode_vring_base(last_avail_idx: int, avail_wrap_counter: int, next_used: int,
                      used_wrap_counter: int) -> int:
    """The 32-bit vhost-user vring base of a packed ring's positions."""
    return ((last_avail_idx & _IDX_MASK) | (avail_wrap_counter & 1) << 15
            | (next_used & _IDX_MASK) << 16 | (used_wrap_counter & 1) << 31)


def decode_vring_base(value: int) -> tuple[int, int, int, int]:
    """``(last_avail_idx, avail_wrap_counter, next_used, used_wrap_counter)``
    of a SET_VRING_BASE value for a packed ring. The 16-bit form (bits 16-31
    zero: DPDK's vhost library and older front-ends send only the avail
    half) means next_used is where the device reads next, as DPDK's
    vhost_user_set_vring_base assumes: a ring stopped by GET_VRING_BASE has
    used everything it took."""
    avail, wrap = value & _IDX_MASK, int(bool(value & _WRAP_BIT))
    upper = (value >> 16) & 0xFFFF
    if upper == 0:
        return avail, wrap, avail, wrap
    return avail, wrap, upper & _IDX_MASK, int(bool(upper & _WRAP_BIT))


class PackedDeviceQueue(QueueBase):
    """One packed ring serviced by the device (``struct vqd_vq`` with its
    packed half, csrc/vqd_pvq.c).

    ``desc`` is the descriptor ring (16·num bytes), ``driver_event`` the
    driver event suppression area (vhost-user's avail address) and
    ``device_event`` the device's (the used address), 4 bytes each: front-end
    virtual addresses unless ``gpa=True``. ``num`` is 1..32768, not
    necessarily a power of two. The device starts at (``last_avail_idx``,
    ``avail_wrap_counter``) and writes used descriptors from (``next_used``,
    ``used_wrap_counter``), by default the same position. ``in_order``: the
    driver negotiated VIRTIO_F_IN_ORDER; then a run of used descriptors with
    len 0 (transmit buffers) is written as one, with the run's last buffer
    id (§2.8.8). Other arguments as DeviceQueue's.

    Raises RingError when the ring cannot be used (size, alignment, a
    position outside the ring), MemoryAccessError when an area is outside
    ``mem``, ArgumentError for a bad ``event_capacity``."""

    layout = "packed"

    def __init__(self, mem, num: int, desc: int, driver_event: int, device_event: int, *,
                 last_avail_idx: int = 0, avail_wrap_counter: int = 1,
                 next_used: int | None = None, used_wrap_counter: int | None = None,
                 event_idx: bool = False, call_fd: int = -1, kick_fd: int = -1, gpa: bool = False,
                 regions: RegionTable | None = None, event_capacity: int = 0,
                 reject_zero_len: bool = False, in_order: bool = False):
        if next_used is None:
            next_used, used_wrap_counter = last_avail_idx, avail_wrap_counter
        if used_wrap_counter is None:
            raise ArgumentError("used_wrap_counter is required with next_used")
        self._setup(mem, num, regions)
        # Chains popped and not yet pushed: buffer id -> ring slots (insertion order: pop order).
        self._popped: dict[int, int] = {}
        try:
            if not 1 <= num <= VIRTQ_MAX_SIZE:
                raise ArgumentError(f"packed queue size {num} is not in 1..{VIRTQ_MAX_SIZE} (VIRTIO 1.2 §2.8)")
            if not gpa:
                desc = mem.uva_to_gpa(desc, PVIRTQ_DESC_SIZE * num)
                driver_event = mem.uva_to_gpa(driver_event, PVIRTQ_EVENT_SUPPR_SIZE)
                device_event = mem.uva_to_gpa(device_event, PVIRTQ_EVENT_SUPPR_SIZE)
            self._pused = ffi.new("struct vqd_pused[]", num)
            rc = lib.vqd_pvq_init(
                self.vq, num, self.regions.host(desc, PVIRTQ_DESC_SIZE * num),
                self.regions.host(driver_event, PVIRTQ_EVENT_SUPPR_SIZE),
                self.regions.host(device_event, PVIRTQ_EVENT_SUPPR_SIZE), self._pused,
                self.regions.array, self.regions.count, last_avail_idx & 0xFFFF,
                avail_wrap_counter & 1, next_used & 0xFFFF, used_wrap_counter & 1,
                1 if event_idx else 0, call_fd, kick_fd)
            check(rc, "packed vring init", self.broken)
        except BaseException:
            self.release()
            raise
        self._finish(event_capacity, reject_zero_len)
        self.vq.in_order = 1 if in_order else 0

    # --- state (the device's positions, §2.8.1) ------------------------------
    @property
    def last_avail_idx(self) -> int:
        """The device's next slot to read (0..num-1)."""
        return self.vq.last_avail_idx

    @property
    def avail_wrap_counter(self) -> int:
        """The wrap counter the device expects at :attr:`last_avail_idx` (0/1)."""
        return self.vq.avail_wrap_counter

    @property
    def next_used(self) -> int:
        """The slot of the device's next used descriptor (0..num-1)."""
        return self.vq.used_idx

    @property
    def used_wrap_counter(self) -> int:
        """The Device Ring Wrap Counter (0/1): the AVAIL/USED bits it writes."""
        return self.vq.used_wrap_counter

    # Names the split ring's users read: the packed meaning of each.
    used_idx = next_used

    @property
    def shadow_avail_idx(self) -> None:
        """None: a packed ring has no avail index for the device to shadow."""
        return None

    @property
    def vhost_base(self) -> int:
        """The ring's vhost-user GET_VRING_BASE value (32-bit packed form)."""
        return encode_vring_base(self.last_avail_idx, self.avail_wrap_counter, self.next_used,
                                 self.used_wrap_counter)

    # --- operations -----------------------------------------------------------
    def avail_count(self) -> int:
        """1 when a chain waits at the device's next slot, else 0 (a packed
        ring has no index saying how many)."""
        return check(lib.vqd_pvq_avail_count(self.vq), "avail", self.broken)

    def pop(self, max_chains: int = 64, max_iov: int = 1024) -> list[Chain]:
        """Pop up to ``max_chains`` available chains; each Chain's ``head``
        is its buffer id (§2.8.6) and ``ndescs`` the ring slots it took.
        Errors and the views' caveat as DeviceQueue.pop."""
        chains = self._pop(lib.vqd_pvq_pop, max_chains, max_iov)
        for c in chains:
            self._popped[c.head] = c.ndescs
        return chains

    def rewind(self, n: int) -> None:
        """Give back the last ``n`` popped chains not yet pushed: the next
        pops return them again."""
        if not 0 <= n <= len(self._popped):
            raise ArgumentError(f"rewind {n}: {len(self._popped)} chain(s) popped and not pushed")
        ids = list(self._popped)[len(self._popped) - n:]
        slots = sum(self._popped.pop(i) for i in ids)
        check(lib.vqd_pvq_rewind(self.vq, slots), "rewind", self.broken)

    def push(self, used: list[tuple[int, int]]) -> int:
        """Return chains as used ``(buffer id, len)``: one used descriptor
        each, written in the order given (the first one's flags last,
        §2.8.9), next_used advancing by each chain's slots. ArgumentError
        for an id that was not popped (or already pushed)."""
        for bid, _ in used:
            if bid not in self._popped:
                raise ArgumentError(f"push: buffer id {bid} was not popped (or was pushed already)")
        for bid, length in used:
            check(lib.vqd_pvq_fill(self.vq, bid, length, self._popped.pop(bid)), "push", self.broken)
        return check(lib.vqd_pvq_flush(self.vq), "push", self.broken)

    def should_notify(self) -> bool:
        """Does the driver want a used buffer notification now (§2.8.10:
        its event suppression area; updates the device's signalled
        position)?"""
        return bool(check(lib.vqd_pvq_should_notify(self.vq), "should_notify", self.broken))

    def notify(self) -> bool:
        """Write the call eventfd if the driver wants it; True if called."""
        return bool(check(lib.vqd_pvq_notify(self.vq), "notify", self.broken))

    def set_notification(self, enable: bool) -> int:
        """Enable kicks (RING_EVENT_FLAGS_DESC at the device's next slot with
        EVENT_IDX, else ENABLE) or disable them (DISABLE) in the device event
        suppression area (§2.8.10); after enabling returns 1 when a chain
        already waits (service it instead of sleeping), else 0."""
        return check(lib.vqd_pvq_set_notification(self.vq, 1 if enable else 0),
                     "set_notification", self.broken)

    def notice(self) -> int:
        """What a kicked device that cannot work does (a stalled queue): ask
        for a kick on every descriptor made available (ENABLE) and look at
        the next slot; returns 1 when a chain waits there, else 0."""
        return check(lib.vqd_pvq_notice(self.vq), "notice", self.broken)
