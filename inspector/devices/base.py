"""The contract between the vhost-user back-end core and a device.

The back-end core (inspector/vhost_user/) speaks the protocol and collects
each vring's untrusted plain state in a :class:`VringConfig`. When a vring
becomes ready (vhost-user spec "Starting and stopping rings": kick fd
received, addresses and size set, and enabled) it calls
:meth:`Device.start_queue`; GET_VRING_BASE, RESET_OWNER or a disconnect call
:meth:`Device.stop_queue`, which returns the ring's vring base. A
device never sees protocol messages and the core never touches rings.

Every device derives from :class:`Device`, which documents each method the
core calls and gives the optional ones a default (no events, no inflight
area, no config space), so the core calls them unconditionally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import DeviceError
from ..memory import GuestMemory


@dataclass
class VringConfig:
    """One vring's state as set by the front-end; plain and untrusted.

    Addresses are front-end virtual addresses (SET_VRING_ADDR); ``base`` is
    the ``last_avail_idx`` from SET_VRING_BASE (``packed``: the vhost-user
    32-bit packed form, inspector/datapath/packed_queue.py). ``packed``:
    the ring is a packed one (VIRTIO_F_RING_PACKED acked; avail/used
    addresses are then the driver/device event suppression areas), set by
    the core when it starts the ring. Fds are owned by the core, which
    closes them; a device must dup() any fd it keeps past stop_queue.
    """

    index: int
    num: int = 0
    # SET_VRING_ADDR (``addr_set`` once received).
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_guest_addr: int = 0
    addr_flags: int = 0
    addr_set: bool = False
    base: int = 0
    # SET_VRING_KICK / CALL / ERR (None: none, or polling for the kick).
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    # SET_VRING_ENABLE; whether the device services it now.
    enabled: bool = False
    started: bool = False
    packed: bool = False


@dataclass
class QueueStats:
    """Counters a device keeps per queue (its data path counts them):
    notifications (``kicks`` received, ``calls`` sent, ``calls_suppressed``
    by the driver's flags or event index), traffic (``packets``, ``bytes``),
    the device's ``last_avail_idx`` and ``shadow_avail_idx`` (avail->idx as
    it last read it; both None: not running; packed rings: the slot, and
    None), a packed ring's other device positions (``last_avail_wrap_counter``,
    ``next_used``, ``used_wrap_counter``; None: split or not running), ``dropped`` (frames a queue
    the device fills could not take: no buffer, a buffer too small, or a
    stall on purpose; None: not a queue the device fills, or not counted),
    why the queue broke (``broken``, None: it did not) and ``inject``: the
    state of faults on purpose (inspector/faults.py), for people (snapshot
    extras ``inject``; None: no fault set on this queue) and ``extras``: a
    device's own counters, copied by name into the snapshot's queue extras
    (virtio-blk: ``{"blk": {...}}``, inspector/devices/blk.py; None: none)."""

    kicks: int = 0
    calls: int = 0
    calls_suppressed: int = 0
    packets: int = 0
    bytes: int = 0
    last_avail_idx: int | None = None
    broken: str | None = None
    shadow_avail_idx: int | None = None
    dropped: int | None = None
    inject: dict | None = None
    last_avail_wrap_counter: int | None = None
    next_used: int | None = None
    used_wrap_counter: int | None = None
    #: VIRTIO_F_ACCESS_PLATFORM: what the ring waits for in the IOTLB (``iova``,
    #: ``perm``, ``misses``, ``waiting_s``), None when nothing.
    iotlb_miss: dict | None = None
    extras: dict | None = None


class Device:
    """Base class of a virtio device behind the back-end.

    ``name``: a short name (the snapshot's device names are ``name`` +
    connection id); ``device_type``: its §5 type; ``num_queues``: the most vrings it has (the core
    refuses vring indices beyond it). A subclass implements at least
    :meth:`features`, :meth:`start_queue`, :meth:`stop_queue` and
    :meth:`queue_stats`; every other method has a default that describes a
    device without that capability.

    Methods are called from the server's loop thread, one at a time per
    connection; :meth:`queue_stats` and :meth:`drain_events` may also be
    called while the device's own threads run.
    """

    name: str = "device"
    num_queues: int = 0

    #: The VIRTIO 1.2 §5 device type name (``net``, ``block``...), which
    #: gives each queue its role (inspector.analysis.roles); None: unknown.
    device_type: str | None = None

    #: Whether the device takes an inflight area (:meth:`set_inflight`): only
    #: then is VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD offered.
    supports_inflight: bool = False

    #: Set by the back-end core: the device calls it (from any thread) with a
    #: reason when a queue breaks (hostile ring, memory truncated). The core
    #: then reports VIRTIO_CONFIG_S_NEEDS_RESET in GET_STATUS (VIRTIO 1.2
    #: §2.1.2) and sends CONFIG_CHANGE_MSG when BACKEND_REQ and CONFIG were
    #: negotiated. None until a core is attached.
    on_needs_reset: Callable[[str], None] | None = None

    #: Set by the back-end core while VIRTIO_F_ACCESS_PLATFORM is negotiated:
    #: the connection's IOTLB (inspector.datapath.iotlb.Iotlb). Rings started
    #: then translate every buffer address through it (StartedRing's
    #: ``iotlb``); the ring addresses in the VringConfig given to
    #: :meth:`start_queue` are already translated. None: guest-physical.
    iotlb = None

    def features(self) -> int:
        """The virtio feature bits offered (a mask of 1 << VIRTIO_F_*; the
        core adds VHOST_USER_F_PROTOCOL_FEATURES). Default: none."""
        return 0

    def set_features(self, features: int) -> None:
        """The front-end's acked features (SET_FEATURES, without bit 30);
        called before rings start. Default: ignored."""

    def queue_num(self) -> int:
        """What GET_QUEUE_NUM answers: the count the front-end compares its
        own with. Default: ``num_queues`` (vhost-user-blk's convention);
        virtio-net devices answer their queue *pairs*, as QEMU and DPDK
        count them."""
        return int(self.num_queues)

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the device config space
        (GET_CONFIG; VIRTIO 1.2 §2.5). Default: no config space, DeviceError
        (the front-end gets libvhost-user's empty failure reply)."""
        raise DeviceError(f"device {self.name} has no config space (GET_CONFIG offset {offset} size {size})")

    def set_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the config space (SET_CONFIG).
        Default: no config space, DeviceError (a non-zero REPLY_ACK; the
        connection lives on)."""
        raise DeviceError(f"device {self.name} has no config space (SET_CONFIG offset {offset} "
                          f"size {len(data)})")

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        """Begin servicing ``vring`` (a ready vring) in ``mem``. Fds in
        ``vring`` stay the core's: dup() any kept past :meth:`stop_queue`.
        An exception breaks the connection. Default: DeviceError."""
        raise DeviceError(f"device {self.name} cannot service vring {vring.index}: it has no data path")

    def stop_queue(self, index: int) -> int:
        """Stop servicing vring ``index``; return its vring base: the
        last_avail_idx (16 bits), or for a packed ring the vhost-user 32-bit
        packed form (both positions with their wrap counters). Only called
        for a vring :meth:`start_queue` started. Default: DeviceError."""
        raise DeviceError(f"device {self.name} has no data path to stop (vring {index})")

    def queue_stats(self, index: int) -> QueueStats:
        """Current counters of vring ``index`` (zeros if never started).
        Default: zeros."""
        return QueueStats()

    def drain_events(self, index: int) -> tuple[bytes, int]:
        """Take vring ``index``'s logged events out, oldest first, as packed
        records (inspector.events.EVENT_RECORD, 16 bytes each: u64 time_ns
        since the epoch (CLOCK_REALTIME), u32 kind code (inspector.events.
        EVENT_KIND_NAMES: kick, call, call_suppressed), u32 value), together
        with the number of events lost so far because its log was full
        (cumulative over the device's life, every start of the vring
        included). Events of a vring that stopped are kept until drained;
        never the same event twice. Records, not tuples: the server drains
        every 50 ms on a thread that may share the data path's CPU and
        decodes only what a reader reads. Default: ``(b"", 0)``, no events."""
        return b"", 0

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        """Take SET_INFLIGHT_FD's area (vhost-user spec "Inflight I/O
        tracking"): ``area`` is an mmap of the whole area for ``num_queues``
        queues of ``queue_size``, owned by the core and closed after
        :meth:`close` or the next SET_INFLIGHT_FD. Only called when
        :attr:`supports_inflight` is True. Default: DeviceError."""
        raise DeviceError(f"device {self.name} does not take an inflight area "
                          f"(supports_inflight is False)")

    def close(self) -> None:
        """Stop every queue and release every resource (disconnect).
        Default: nothing to release."""
