"""The contract between the vhost-user back-end core and a device.

The back-end core (inspector/vhost_user/backend.py) speaks the protocol and
collects each vring's untrusted plain state in a :class:`VringConfig`. When a
vring becomes ready (VIRTIO 1.2 / vhost-user spec "Starting and stopping
rings": kick fd received, addresses and size set, and enabled) it calls
``Device.start_queue``; GET_VRING_BASE, RESET_OWNER or a disconnect call
``Device.stop_queue``, which returns the ring's ``last_avail_idx``.
A device never sees protocol messages and the core never touches rings.

A device may also log timed events per vring (kicks, calls; see
inspector/events.py): the server drains them with ``drain_events`` when the
device has that method (it is optional, like every method a Protocol
documents but a device does not need).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..memory import GuestMemory


@dataclass
class VringConfig:
    """One vring's state as set by the front-end; plain and untrusted.

    Addresses are front-end virtual addresses (SET_VRING_ADDR); ``base`` is
    the ``last_avail_idx`` from SET_VRING_BASE. Fds are owned by the core,
    which closes them; a device must dup() any fd it keeps past stop_queue.
    """

    index: int
    num: int = 0
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_guest_addr: int = 0
    addr_flags: int = 0
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    addr_set: bool = False


@dataclass
class QueueStats:
    """Counters a device keeps per queue (its data path counts them)."""

    kicks: int = 0
    calls: int = 0
    calls_suppressed: int = 0
    packets: int = 0
    bytes: int = 0
    last_avail_idx: int | None = None
    broken: str | None = None


class Device(Protocol):
    """A virtio device behind the back-end. ``features`` are the virtio
    feature bits it offers (VIRTIO_F_VERSION_1 etc.; the core adds
    VHOST_USER_F_PROTOCOL_FEATURES); ``num_queues`` the most vrings it has."""

    name: str
    num_queues: int

    def features(self) -> int: ...

    def set_features(self, features: int) -> None:
        """The front-end's acked features (SET_FEATURES); called before rings start."""

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the device config space (GET_CONFIG)."""

    def set_config(self, offset: int, data: bytes) -> None: ...

    def start_queue(self, vring: VringConfig, mem: GuestMemory) -> None:
        """Begin servicing ``vring`` (a ready vring) in ``mem``."""

    def stop_queue(self, index: int) -> int:
        """Stop servicing vring ``index``; return its last_avail_idx."""

    def queue_stats(self, index: int) -> QueueStats:
        """Current counters of vring ``index`` (zeros if never started)."""

    # Optional:
    #
    # def drain_events(self, index: int) -> tuple[bytes, int]:
    #     """Take vring ``index``'s logged events out, oldest first, as packed
    #     records (inspector.vqd.EVENT_RECORD, 16 bytes each: u64 time_ns since
    #     the epoch (CLOCK_REALTIME), u32 kind code (inspector.vqd.
    #     EVENT_KIND_NAMES: kick, call, call_suppressed), u32 value (inspector.
    #     events.KINDS); vqd.decode_events / encode_events convert from and to
    #     tuples), together with the number of events lost so far because its
    #     log was full (cumulative over the device's life, every start of the
    #     vring included). Events of a vring that stopped are kept until
    #     drained. Never the same event twice. Records, not tuples: the server
    #     drains every 50 ms on a thread that may share the data path's CPU,
    #     and decodes only what a client reads (0.4 vs ~340 ns per event)."""
    #
    # on_needs_reset: Callable[[str], None] | None
    #     An attribute the back-end core sets when the device has it: the
    #     device calls it (from any thread) with a reason when a queue breaks
    #     (hostile ring, memory truncated). The core then reports
    #     VIRTIO_CONFIG_S_NEEDS_RESET in GET_STATUS (VIRTIO 1.2 §2.1.2) and
    #     sends CONFIG_CHANGE_MSG when BACKEND_REQ and CONFIG were negotiated.

    def close(self) -> None:
        """Stop every queue and release every resource (disconnect)."""
