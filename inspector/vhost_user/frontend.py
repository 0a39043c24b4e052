"""A vhost-user front-end (the driver side), for ``vqscope demo``, ``vqscope
load blk`` and tests.

:class:`FrontendCore` is the device-agnostic part: it owns guest memory (a
memfd it maps), builds split rings in it with
inspector.ring.driver.DriverRing, or packed rings with
inspector.ring.driver_packed.PackedDriverRing when the back-end offers
VIRTIO_F_RING_PACKED (unless told not to), and does the handshake the way
QEMU does; the driver operations on its vrings (kicks honouring
notification suppression, used buffers, calls on eventfds) are
:class:`~.driver_queue.QueueDriver`'s. :class:`VhostUserFrontend` drives a
virtio-net device on it (RX buffers, TX frames: :mod:`.net_driver`);
:class:`~.blk_frontend.BlkFrontend` a virtio-blk device. Guest-physical addresses start at 0; the
front-end virtual addresses it sends are the mmap's real address, so a
back-end that confuses the two fails visibly.

Memory layout: the vrings from gpa 0, each in a 4096-aligned area large
enough for either layout (split: legacy contiguous layout; packed:
descriptor ring, driver then device event suppression area), then
fixed-size frame slots up to ``mem_size``.

Faults on purpose (tests of a back-end's robustness): :meth:`write_hostile`
puts a ring violation of one of :data:`HOSTILE_KINDS` on a vring while
traffic runs, :meth:`shrink_memory` truncates the memfd behind the memory
table (after which this front-end must not touch guest memory past the new
size itself: its own mapping faults there too). Driver faults
(``faults``, inspector/faults.py: ``withhold-kicks``, ``stop-consuming``)
make it a stuck or buggy driver, for tests of diagnosis tools.

Behind a virtual IOMMU (``iommu=True``: VIRTIO_F_ACCESS_PLATFORM) ring and
buffer addresses are IOVAs and misses from the back-end are answered with
IOTLB updates: :mod:`.frontend_iommu`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import time

from ..datapath.packed_queue import encode_vring_base
from ..errors import InspectorError, ProtocolError
from ..layout import is_power_of_two, packed_layout, split_layout
from ..memory import GuestMemory
from ..ring.driver import DriverRing
from ..ring.driver_packed import PackedDriverRing
from ..spec.vhost import VHOST_USER_F_PROTOCOL_FEATURES
from ..spec.virtio import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                           VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED,
                           VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX, has_feature)
from .protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, REQUESTS, VERSION, ConfigPayload, InflightPayload, MemoryRegionDesc,
    MemoryTable, ProtocolFeature, Request, VringAddr, VringState, has_reply, pack_u64, unpack_inflight,
)
# HOSTILE_KINDS and HOSTILE_PACKED_KINDS are re-exported: tests name them from here.
from .driver_queue import DriverQueue, QueueDriver
from .frontend_iommu import IommuFrontend, IotlbPolicy
from .net_driver import HOSTILE_KINDS, HOSTILE_PACKED_KINDS, VirtioNetDriver  # noqa: F401
from .transport import Message, recv_message, send_message

def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class FrontendCore(IommuFrontend, QueueDriver):
    """A vhost-user front-end of any device: connect to the back-end at
    ``socket_path`` and set up ``num_vrings`` vrings of ``queue_size``
    entries in ``mem_size`` bytes of shared memory (a memfd), as QEMU does.

    ``want_features``: the virtio feature bits to ack when offered
    (VIRTIO_F_VERSION_1 is always wanted; ``event_idx`` adds
    VIRTIO_RING_F_EVENT_IDX and ``packed`` VIRTIO_F_RING_PACKED).
    ``queue_count``: what GET_QUEUE_NUM must reach (devices count queues
    their own way: virtio-net pairs, virtio-blk queues; default
    ``num_vrings``). ``slot_size``: the size of the buffer slots after the
    rings (``_alloc_slot`` / ``_slot_gpa``). ``handshake=False`` only
    connects (for negative tests: use send_raw / recv_reply, then
    handshake()). ``inflight``: negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
    when offered: the back-end's area (GET_INFLIGHT_FD) is kept in
    ``inflight_map`` and handed to it, and to every back-end after a
    :meth:`reconnect`, with SET_INFLIGHT_FD. ``faults``: driver faults on
    purpose (:meth:`set_faults`). ``iommu``: ack VIRTIO_F_ACCESS_PLATFORM
    (the handshake fails when the back-end does not offer it, or REPLY_ACK
    and BACKEND_REQ) and give the device IOVAs; misses are answered as
    ``iotlb_policy`` (:class:`~.frontend_iommu.IotlbPolicy`) says, in
    :meth:`serve_misses` and while waiting for calls. Raises ProtocolError
    when the back-end breaks the protocol or cannot give what was asked,
    OSError on socket errors."""

    def __init__(self, socket_path: str, num_vrings: int, queue_size: int = 256,
                 mem_size: int = 64 << 20, *, want_features: int = 0, queue_count: int | None = None,
                 event_idx: bool = False, packed: bool = True, slot_size: int = 4096,
                 handshake: bool = True, timeout: float = 5.0, inflight: bool = False, faults=(),
                 iommu: bool = False, iotlb_policy: IotlbPolicy | None = None):
        self.socket_path = socket_path
        self.num_vrings = num_vrings
        self.queue_count = num_vrings if queue_count is None else queue_count
        self.queue_size = queue_size
        self.mem_size = mem_size
        self.slot_size = slot_size
        self.want_features = 1 << VIRTIO_F_VERSION_1 | want_features
        if event_idx:
            self.want_features |= 1 << VIRTIO_RING_F_EVENT_IDX
        if packed:
            self.want_features |= 1 << VIRTIO_F_RING_PACKED
        self._init_iommu(iommu, iotlb_policy)
        if iommu:
            self.want_features |= 1 << VIRTIO_F_ACCESS_PLATFORM
        self.features = 0
        self.device_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.queues: list[DriverQueue] = []
        self.set_faults(faults)
        self._fds: list[int] = []
        self.backend_channel: socket.socket | None = None
        self.want_inflight = inflight
        self.inflight_fd = -1
        self.inflight_map: mmap.mmap | None = None
        self.inflight: InflightPayload | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.memfd = -1
        self.map: mmap.mmap | None = None
        try:
            self.sock.connect(socket_path)
            self.memfd = os.memfd_create("vqscope-guest", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, mem_size)
            self.map = mmap.mmap(self.memfd, mem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(self.map)
            self.uva = ctypes.addressof(anchor)
            del anchor
            self.mem = GuestMemory()
            self.mem.add(0, self.map, uva=self.uva, size=mem_size)
            self._layout()
            if handshake:
                self.handshake()
        except BaseException:
            self.close()
            raise

    # --- memory ------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """Were packed rings negotiated (VIRTIO_F_RING_PACKED)?"""
        return has_feature(self.features, VIRTIO_F_RING_PACKED)

    def _layout(self) -> None:
        # Laid out before the features are known: room for either layout (a
        # size that is not a power of two has only the packed one, §2.8).
        sizes = [packed_layout(self.queue_size).total_size]
        if is_power_of_two(self.queue_size):
            sizes.append(split_layout(self.queue_size, 4096).total_size)
        self.ring_bytes = ring_bytes = _align(max(sizes), 4096)
        self.ring_base = [i * ring_bytes for i in range(self.num_vrings)]
        self.slots_base = _align(self.num_vrings * ring_bytes, 4096)
        nslots = (self.mem_size - self.slots_base) // self.slot_size
        if nslots < 1:
            raise InspectorError(f"mem_size {self.mem_size:#x} is too small for {self.num_vrings} "
                                 f"rings of {self.queue_size}")
        self.free_slots = list(range(nslots - 1, -1, -1))

    def gpa_to_uva(self, gpa: int) -> int:
        return gpa + self.uva

    def _slot_gpa(self, slot: int) -> int:
        return self.slots_base + slot * self.slot_size

    def _alloc_slot(self) -> int:
        if not self.free_slots:
            raise InspectorError("front-end: no free frame slot in guest memory")
        return self.free_slots.pop()

    # --- messages ------------------------------------------------------------------
    def send_raw(self, request: int, payload: bytes = b"", fds=(), flags: int | None = None,
                 size: int | None = None) -> None:
        """Send any message verbatim (``flags`` defaults to version 1)."""
        send_message(self.sock, int(request), payload, fds=fds,
                     flags=VERSION if flags is None else flags, size=size)

    def recv_reply(self, keep_fds: bool = False) -> Message:
        """Read one reply; raises ProtocolError when the back-end closed.
        Fds that came with it are closed unless ``keep_fds`` (the caller's)."""
        msg = recv_message(self.sock)
        if msg is None:
            raise ProtocolError("back-end closed the connection")
        if not keep_fds:
            for fd in msg.fds:
                os.close(fd)
            msg.fds = []
        if not msg.flags & FLAG_REPLY:
            raise ProtocolError(f"{msg.name}: reply without the REPLY flag (flags {msg.flags:#x})")
        return msg

    def _request(self, request: Request, payload: bytes = b"", fds=()) -> Message | None:
        """Send; read the reply of requests that have one (protocol.REQUESTS),
        or the REPLY_ACK when negotiated (raising on a non-zero ack). REPLY_ACK
        is not asked for a request that may have a reply of its own."""
        ack = (self.protocol_features & ProtocolFeature.REPLY_ACK) and REQUESTS[request].reply is False
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        self.send_raw(request, payload, fds, flags)
        if has_reply(request, self.protocol_features) or ack:
            reply = self.recv_reply()
            if reply.request != request:
                raise ProtocolError(f"{request.name}: got a reply to {reply.name}")
            if ack and struct.unpack("<Q", reply.payload)[0] != 0:
                raise ProtocolError(f"{request.name}: back-end answered REPLY_ACK with failure")
            return reply
        return None

    def _get_u64(self, request: Request) -> int:
        reply = self._request(request)
        if len(reply.payload) != 8:
            raise ProtocolError(f"{request.name}: reply of {len(reply.payload)} bytes, want 8")
        return struct.unpack("<Q", reply.payload)[0]

    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self._request(Request.GET_CONFIG, ConfigPayload(offset, size, 0, bytes(size)).pack())
        if len(reply.payload) != 12 + size:
            raise ProtocolError(f"GET_CONFIG: reply of {len(reply.payload)} bytes, want {12 + size}")
        return reply.payload[12:]

    def get_vring_base(self, index: int) -> int:
        """Stop vring ``index`` (GET_VRING_BASE) and return its base: a split
        ring's last_avail_idx, a packed ring's positions in the vhost-user
        encoding (inspector.datapath.packed_queue.decode_vring_base)."""
        reply = self._request(Request.GET_VRING_BASE, VringState(index, 0).pack())
        return struct.unpack("<II", reply.payload)[1]

    # --- handshake ---------------------------------------------------------------------
    def handshake(self) -> None:
        """QEMU's sequence: features, owner, protocol features, queue count,
        features ack, memory table, then each vring's size, base, addresses,
        kick, call and enable."""
        self.device_features = self.get_features()
        self._request(Request.SET_OWNER)
        if has_feature(self.device_features, VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            want = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                    | ProtocolFeature.LOG_SHMFD | ProtocolFeature.BACKEND_REQ | ProtocolFeature.STATUS)
            acked = offered & int(want)
            if self.want_inflight:
                acked |= offered & int(ProtocolFeature.INFLIGHT_SHMFD)
            self._request(Request.SET_PROTOCOL_FEATURES, pack_u64(acked))
            self.protocol_features = acked
            if acked & ProtocolFeature.MQ:
                self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
                if self.queue_count > self.queue_num:
                    raise ProtocolError(f"back-end supports {self.queue_num} queue(s); "
                                        f"{self.queue_count} asked for")
            elif self.queue_count > 1:
                raise ProtocolError("back-end does not offer VHOST_USER_PROTOCOL_F_MQ; "
                                    f"{self.queue_count} queues asked for, only 1 is possible")
            if acked & ProtocolFeature.BACKEND_REQ:
                mine, theirs = socket.socketpair()
                try:
                    self._request(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
                finally:
                    theirs.close()
                self.backend_channel = mine
        if self.iommu:
            if not has_feature(self.device_features, VIRTIO_F_ACCESS_PLATFORM):
                raise ProtocolError(f"an IOMMU front-end needs VIRTIO_F_ACCESS_PLATFORM; the back-end offers "
                                    f"features {self.device_features:#x} without it")
            self.check_iommu_negotiated()
        self.features = self.device_features & (self.want_features | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self._request(Request.SET_FEATURES, pack_u64(self.features))
        self._request(Request.SET_MEM_TABLE,
                      MemoryTable([MemoryRegionDesc(0, self.mem_size, self.uva, 0)]).pack(),
                      fds=[self.memfd])
        if self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            self._setup_inflight()
        for i in range(self.num_vrings):
            self._setup_vring(i)
        if self.protocol_features & ProtocolFeature.STATUS:
            # As a virtio driver ends initialisation (§3.1.1), and as QEMU does.
            self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                            | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)

    # --- device status (PROTOCOL_F_STATUS) ------------------------------------------------
    def get_status(self) -> int:
        """GET_STATUS: the device status byte (VIRTIO 1.2 §2.1), e.g. with
        VIRTIO_CONFIG_S_NEEDS_RESET once the device broke. Needs STATUS."""
        if not self.protocol_features & ProtocolFeature.STATUS:
            raise ProtocolError("GET_STATUS: VHOST_USER_PROTOCOL_F_STATUS was not negotiated")
        return self._get_u64(Request.GET_STATUS)

    def set_status(self, status: int) -> None:
        """SET_STATUS (0 resets the device status). Needs STATUS."""
        if not self.protocol_features & ProtocolFeature.STATUS:
            raise ProtocolError("SET_STATUS: VHOST_USER_PROTOCOL_F_STATUS was not negotiated")
        self._request(Request.SET_STATUS, pack_u64(status))

    def recv_backend_request(self, timeout: float = 1.0) -> Message | None:
        """One back-end → front-end message from the SET_BACKEND_REQ_FD
        channel (e.g. CONFIG_CHANGE_MSG), or None after ``timeout`` s. With
        the IOMMU, misses are answered on the way (serve_misses) and not
        returned."""
        if self.backend_channel is None:
            raise ProtocolError("no back-end channel: BACKEND_REQ was not negotiated")
        if self.iommu:
            deadline = time.monotonic() + timeout
            while not self._backend_pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.serve_misses(left)
            return self._backend_pending.popleft()
        if not select.select([self.backend_channel], [], [], timeout)[0]:
            return None
        msg = recv_message(self.backend_channel)
        if msg is not None:
            msg.close_fds()
        return msg

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _setup_inflight(self) -> None:
        """GET_INFLIGHT_FD once (the back-end allocates the area; mapped in
        ``inflight_map``), then SET_INFLIGHT_FD with it on every connection,
        as QEMU's vhost_dev_get_inflight / vhost_dev_set_inflight."""
        nq = self.num_vrings
        if self.inflight_fd < 0:
            self.send_raw(Request.GET_INFLIGHT_FD, InflightPayload(0, 0, nq, self.queue_size).pack())
            reply = self.recv_reply(keep_fds=True)
            fds, reply.fds = reply.fds, []
            try:
                if reply.request != Request.GET_INFLIGHT_FD or len(fds) != 1:
                    raise ProtocolError(f"GET_INFLIGHT_FD: got {reply.name} with {len(fds)} fd(s), "
                                        f"want its reply with 1")
                inf = unpack_inflight(reply.name, reply.payload)
                if inf.mmap_size == 0:
                    raise ProtocolError("GET_INFLIGHT_FD: the back-end gave an area of 0 bytes")
                self.inflight_map = mmap.mmap(fds[0], inf.mmap_size, mmap.MAP_SHARED,
                                              mmap.PROT_READ | mmap.PROT_WRITE, offset=inf.mmap_offset)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self.inflight_fd = fds[0]
            self.inflight = InflightPayload(inf.mmap_size, inf.mmap_offset, nq, self.queue_size)
        self._request(Request.SET_INFLIGHT_FD, self.inflight.pack(), fds=[self.inflight_fd])

    def reconnect(self, socket_path: str | None = None) -> None:
        """Connect to the back-end again (a restarted one) and repeat the
        handshake on the same memory and rings, as QEMU does with a
        ``reconnect`` chardev: each vring's base is its used index in guest
        memory (a dead back-end cannot answer GET_VRING_BASE) and the
        inflight area, if any, goes to the new back-end with
        SET_INFLIGHT_FD. Buffers in flight stay where they are. A packed
        vring's base is the device's used position as the ring shows it
        (PackedDriverRing.device_used_position), as both halves of the
        vhost-user packed encoding: the positions QEMU would have had from
        GET_VRING_BASE with nothing in flight."""
        timeout = self.sock.gettimeout()
        for s in (self.sock, self.backend_channel):
            if s is not None:
                s.close()
        self.backend_channel = None
        self._backend_pending.clear()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path or self.socket_path)
        self.handshake()

    def _setup_vring(self, i: int) -> None:
        if i < len(self.queues):  # reconnect(): the same ring, from where the device was
            q = self.queues[i]
            if q.packed != self.packed:
                raise ProtocolError(f"reconnect: vring {i} is {'packed' if q.packed else 'split'} but "
                                    f"the back-end negotiated {'packed' if self.packed else 'split'} rings")
        else:
            if not self.packed and not is_power_of_two(self.queue_size):
                raise ProtocolError(f"queue size {self.queue_size} needs packed rings (a split ring's is a "
                                    f"power of two, VIRTIO 1.2 §2.7): VIRTIO_F_RING_PACKED was not negotiated")
            ring_cls = PackedDriverRing if self.packed else DriverRing
            q = DriverQueue(i, ring_cls(self.mem, self.ring_base[i], self.queue_size),
                            self._eventfd(), self._eventfd())
            self.queues.append(q)
        ring = q.ring
        if q.packed:
            slot, wrap = ring.device_used_position()
            base = encode_vring_base(slot, wrap, slot, wrap)
            areas = (ring.desc_addr, ring.device_event_addr, ring.driver_event_addr)
        else:
            base = ring.used_idx
            areas = (ring.desc_addr, ring.used_addr, ring.avail_addr)
        self._request(Request.SET_VRING_NUM, VringState(i, self.queue_size).pack())
        self._request(Request.SET_VRING_BASE, VringState(i, base).pack())
        desc, used, avail = (self.ring_addr(a) for a in areas)
        self._request(Request.SET_VRING_ADDR, VringAddr(i, 0, desc, used, avail, 0).pack())
        self._request(Request.SET_VRING_KICK, pack_u64(i), fds=[q.kick_fd])
        self._request(Request.SET_VRING_CALL, pack_u64(i), fds=[q.call_fd])
        if has_feature(self.features, VHOST_USER_F_PROTOCOL_FEATURES):
            self._request(Request.SET_VRING_ENABLE, VringState(i, 1).pack())
        q.faults = tuple(f for f in self.faults if f.vring == i)
        q.started = time.monotonic()

    # --- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection, eventfds, memfd and mapping."""
        for s in (self.sock, self.backend_channel):
            if s is not None:
                s.close()
        self.backend_channel = None
        for fd in self._fds + [self.inflight_fd, self.memfd]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds, self.inflight_fd, self.memfd = [], -1, -1
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        if self.map is not None:
            self.queues = []
            self.mem = None
            try:
                self.map.close()
            except BufferError:
                pass
            self.map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VhostUserFrontend(FrontendCore, VirtioNetDriver):
    """The built-in front-end of a virtio-net device: ``queue_pairs`` queue
    pairs (vring 2p: RX, 2p+1: TX; GET_QUEUE_NUM counts pairs, as QEMU and
    DPDK do) of ``queue_size`` entries in ``mem_size`` bytes, frames in
    ``slot_size`` slots. ``event_idx`` / ``mrg_rxbuf``: ack
    VIRTIO_RING_F_EVENT_IDX / VIRTIO_NET_F_MRG_RXBUF when offered;
    ``extra_features`` are acked too when offered; ``packed``: ack
    VIRTIO_F_RING_PACKED when offered (False forces split rings). The other
    arguments (``iommu``, ``iotlb_policy`` too) are :class:`FrontendCore`'s."""

    def __init__(self, socket_path: str, queue_pairs: int = 1, queue_size: int = 256,
                 mem_size: int = 64 << 20, *, event_idx: bool = False, mrg_rxbuf: bool = False,
                 extra_features: int = 0, slot_size: int = 4096, handshake: bool = True,
                 timeout: float = 5.0, inflight: bool = False, faults=(), packed: bool = True,
                 iommu: bool = False, iotlb_policy: IotlbPolicy | None = None):
        self.queue_pairs = queue_pairs
        want = extra_features | (1 << VIRTIO_NET_F_MRG_RXBUF if mrg_rxbuf else 0)
        super().__init__(socket_path, 2 * queue_pairs, queue_size, mem_size, want_features=want,
                         queue_count=queue_pairs, event_idx=event_idx, packed=packed, slot_size=slot_size,
                         handshake=handshake, timeout=timeout, inflight=inflight, faults=faults,
                         iommu=iommu, iotlb_policy=iotlb_policy)
