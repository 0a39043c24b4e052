"""The virtio-blk driver on the built-in vhost-user front-end (VIRTIO 1.2
§5.2): a front-end that drives any vhost-user-blk back-end without a VM —
``vqscope serve blk``, qemu-storage-daemon, SPDK — for tests, and the
handshake and guest memory of ``vqscope load blk`` (whose data path is C).

Each request takes one buffer slot of guest memory: its 16-byte header
(struct virtio_blk_outhdr) at the slot's start, the status byte right after
it, and the data from the slot's next 4 KiB boundary (so that a back-end
using O_DIRECT sees aligned buffers), at most ``max_data`` bytes. A chain is
header (device-readable), data (readable for OUT/DISCARD/WRITE_ZEROES,
device-writable for IN/GET_ID), status (device-writable), as §5.2.6 lays
it out. :meth:`BlkFrontend.submit_chain` builds any other shape, for tests
of a back-end's answers to bad requests.

Completions are matched to what was submitted by head: the status is read
from where this front-end put the status byte, never from where the
back-end says, whenever the used length is at least 1. A device that fails
a request may write only the status byte (used length 1, §5.2.6), so a
used length short of the data does not hide the status; the byte is set to
0xff before submission, so a status the device never wrote reads as 0xff,
not as a valid VIRTIO_BLK_S_*. A used length of 0 (nothing written) leaves
``status`` None.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from ..errors import InspectorError, ProtocolError
from ..spec.virtio import (VIRTIO_BLK_CONFIG_FIELDS, VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F_BLK_SIZE,
                           VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
                           VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
                           VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_NAMES, VIRTIO_RING_F_INDIRECT_DESC)
from .driver_queue import DriverQueue
from .frontend import FrontendCore, _align
from .frontend_iommu import IotlbPolicy

_OUTHDR = struct.Struct("<IIQ")            # type, ioprio (reserved), sector
_SEGMENT = struct.Struct("<QII")           # sector, num_sectors, flags
#: QEMU 7.2's sizeof(struct virtio_blk_config) (no secure-erase fields): the
#: size asked for when a back-end refuses VIRTIO 1.2's 72 bytes.
_CONFIG_SIZE_QEMU_7_2 = 60
_DATA_OFFSET = 4096                        # data starts one page into the slot

#: The virtio-blk feature bits this driver acks when offered.
BLK_DRIVER_FEATURES = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                       | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_MQ | 1 << VIRTIO_BLK_F_DISCARD
                       | 1 << VIRTIO_BLK_F_WRITE_ZEROES | 1 << VIRTIO_BLK_F_RO | 1 << VIRTIO_BLK_F_CONFIG_WCE
                       | 1 << VIRTIO_RING_F_INDIRECT_DESC)


@dataclass
class Completion:
    """One used request: ``head`` (split: head descriptor index; packed:
    buffer id), ``status`` (the byte at the status buffer, VIRTIO_BLK_S_*,
    or 0xff if the device did not write it; None when there was no status
    buffer or the used length is 0),
    ``data`` (the device-writable data bytes, IN/GET_ID: as many as the used
    length covers), ``used_len`` (what the device put in the used element),
    and what was asked: ``type`` (VIRTIO_BLK_T_*, None for a raw chain) and
    ``sector``."""

    head: int
    status: int | None
    data: bytes
    used_len: int
    type: int | None = None
    sector: int | None = None

    @property
    def type_name(self) -> str:
        return VIRTIO_BLK_T_NAMES.get(self.type, str(self.type))


@dataclass
class _Pending:
    slot: int
    type: int | None
    sector: int | None
    status_gpa: int | None        # where the status byte was put (None: no status buffer)
    in_gpa: int = 0
    in_len: int = 0
    submitted: float = field(default_factory=time.monotonic)


class BlkFrontend(FrontendCore):
    """Connect to a vhost-user-blk back-end at ``socket_path`` and set up
    ``num_queues`` request queues (vring i = requestq i; GET_QUEUE_NUM
    counts queues) of ``queue_size`` entries in ``mem_size`` bytes of shared
    memory, with buffer slots for requests of up to ``max_data`` data bytes.
    ``event_idx``, ``packed``, ``inflight`` (keep the back-end's inflight
    area across :meth:`reconnect`), ``handshake``, ``timeout``,
    ``faults``, ``iommu`` and ``iotlb_policy`` are
    :class:`~.frontend.FrontendCore`'s. Acks the virtio-blk
    features in :data:`BLK_DRIVER_FEATURES` that the back-end offers, plus
    ``extra_features``.

    Raises ProtocolError when the back-end breaks the protocol,
    InspectorError when a request does not fit its slot or the ring is full."""

    def __init__(self, socket_path: str, num_queues: int = 1, queue_size: int = 128,
                 mem_size: int = 64 << 20, *, event_idx: bool = True, packed: bool = False,
                 inflight: bool = False, handshake: bool = True, timeout: float = 5.0,
                 max_data: int = 64 << 10, extra_features: int = 0, faults=(), iommu: bool = False,
                 iotlb_policy: IotlbPolicy | None = None):
        self.max_data = max_data
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._done: dict[int, list[Completion]] = {}
        super().__init__(socket_path, num_queues, queue_size, mem_size,
                         want_features=BLK_DRIVER_FEATURES | extra_features, event_idx=event_idx,
                         packed=packed, slot_size=_DATA_OFFSET + _align(max(max_data, 1), 4096),
                         handshake=handshake, timeout=timeout, inflight=inflight, faults=faults,
                         iommu=iommu, iotlb_policy=iotlb_policy)

    @property
    def num_queues(self) -> int:
        return self.num_vrings

    #: Where a slot's data starts (bytes into the slot): one page in, so that
    #: a back-end using O_DIRECT sees page-aligned data buffers.
    DATA_OFFSET = _DATA_OFFSET

    def take_request_slots(self, n: int) -> list[tuple[int, int, int]]:
        """``n`` buffer slots for a driver outside this class (``load blk``'s
        C engine), laid out as :meth:`submit` lays out its own: per slot
        (header gpa, status gpa, data gpa), the 16-byte header at the slot's
        start, the status byte right after it, ``slot_size - DATA_OFFSET``
        data bytes from ``DATA_OFFSET``. They stay taken for this front-end's
        life. Raises InspectorError when fewer than ``n`` slots are free, or
        behind an IOMMU (the addresses are guest-physical, not IOVAs)."""
        if self.iommu:
            raise InspectorError("request slots for an outside driver give guest-physical addresses; this "
                                 "front-end negotiated VIRTIO_F_ACCESS_PLATFORM (IOVAs): use submit()")
        if n > len(self.free_slots):
            raise InspectorError(f"front-end: {n} request slots asked for, {len(self.free_slots)} free")
        out = []
        for _ in range(n):
            base = self._slot_gpa(self._alloc_slot())
            out.append((base, base + _align(_OUTHDR.size, 8), base + _DATA_OFFSET))
        return out

    # --- config space ------------------------------------------------------------------------
    def config(self) -> dict[str, int]:
        """GET_CONFIG decoded by field (spec VIRTIO_BLK_CONFIG_FIELDS): every
        field the answer covers, in its units (capacity in 512-byte sectors).
        Asks for VIRTIO 1.2's 72 bytes and, if the back-end refuses, for the
        60 of QEMU 7.2's headers."""
        try:
            raw = self.get_config(0, VIRTIO_BLK_CONFIG_SIZE)
        except ProtocolError:
            raw = self.get_config(0, _CONFIG_SIZE_QEMU_7_2)
        return {name: int.from_bytes(raw[off:off + size], "little")
                for name, (off, size) in VIRTIO_BLK_CONFIG_FIELDS.items()
                if off + size <= len(raw) and not name.startswith("unused")}

    # --- requests ------------------------------------------------------------------------------
    def submit(self, q: int, type: int, sector: int = 0, data: bytes = b"", in_len: int = 0, *,
               status_len: int = 1, header: bytes | None = None,
               segments: list[tuple[int, int, int]] | None = None, publish: bool = True) -> int:
        """Put one request on requestq ``q``: the header (``type``,
        ``sector``; or the raw bytes ``header``, e.g. a short one), then
        ``data`` as a device-readable buffer (OUT; or ``segments``, a list of
        (sector, num_sectors, flags) packed as struct
        virtio_blk_discard_write_zeroes for DISCARD/WRITE_ZEROES), then
        ``in_len`` device-writable bytes (IN, GET_ID), then a
        ``status_len``-byte device-writable status buffer (0: none). Publishes
        and kicks as the device asked unless ``publish`` is False (then call
        :meth:`publish`). Returns the head."""
        hdr = _OUTHDR.pack(type, 0, sector) if header is None else header
        if segments is not None:
            data = b"".join(_SEGMENT.pack(*seg) for seg in segments)
        if data and in_len:
            raise InspectorError("a request has device-readable or device-writable data, not both")
        if len(hdr) + status_len > _DATA_OFFSET:
            raise InspectorError(f"header of {len(hdr)} bytes and status of {status_len} do not fit "
                                 f"{_DATA_OFFSET} bytes")
        data_len = len(data) or in_len
        if data_len > self.slot_size - _DATA_OFFSET:
            raise InspectorError(f"{data_len} data bytes exceed max_data {self.max_data}")
        queue = self.queues[q]
        slot = self._alloc_slot()
        base = self._slot_gpa(slot)
        status_gpa = base + _align(len(hdr), 8) if status_len else None
        data_gpa = base + _DATA_OFFSET
        bufs = []
        if hdr:
            self.mem.view(base, len(hdr))[:] = hdr
            bufs.append((base, len(hdr), False))
        if data:
            self.mem.view(data_gpa, len(data))[:] = data
            bufs.append((data_gpa, len(data), False))
        if in_len:
            bufs.append((data_gpa, in_len, True))
        if status_len:
            self.mem.view(status_gpa, status_len)[:] = b"\xff" * status_len   # not a status: unwritten
            bufs.append((status_gpa, status_len, True))
        return self._add(queue, bufs, slot, _Pending(
            slot, type if header is None else None, sector if header is None else None, status_gpa,
            data_gpa, in_len), publish)

    def submit_chain(self, q: int, buffers: list[tuple[bytes | int, bool]], *,
                     publish: bool = True) -> int:
        """Put a chain of any shape on requestq ``q``: ``buffers`` is a list
        of (bytes to write, or a length, device_writable), laid out one after
        the other (8-byte aligned) in one slot. The status is taken to be the
        last byte of the last device-writable buffer, as §5.2.6 says a device
        must find it. Returns the head."""
        queue = self.queues[q]
        slot = self._alloc_slot()
        gpa = base = self._slot_gpa(slot)
        bufs = []
        for content, writable in buffers:
            n = content if isinstance(content, int) else len(content)
            if gpa + n > base + self.slot_size:
                self.free_slots.append(slot)
                raise InspectorError(f"chain of {len(buffers)} buffers does not fit a {self.slot_size}-byte slot")
            if not isinstance(content, int):
                self.mem.view(gpa, n)[:] = content
            elif writable and n:
                self.mem.view(gpa, n)[:] = b"\xff" * n
            bufs.append((gpa, n, writable))
            gpa = _align(gpa + max(n, 1), 8)
        writable = [b for b in bufs if b[2]]
        status_gpa = writable[-1][0] + writable[-1][1] - 1 if writable and writable[-1][1] else None
        return self._add(queue, bufs, slot, _Pending(slot, None, None, status_gpa), publish)

    def _add(self, queue: DriverQueue, bufs, slot: int, pending: _Pending, publish: bool) -> int:
        try:   # the device's addresses: IOVAs behind an IOMMU (FrontendCore.dma_addr)
            head = queue.ring.add_chain([(self.dma_addr(gpa, w), n, w) for gpa, n, w in bufs])
        except BaseException:
            self.free_slots.append(slot)
            raise
        queue.slots[head] = slot
        self._pending[(queue.index, head)] = pending
        if publish:
            self.publish(queue.index)
        return head

    def in_flight(self, q: int) -> list[int]:
        """Heads submitted on requestq ``q`` and not yet completed."""
        return [h for (qi, h) in self._pending if qi == q]

    def complete(self, q: int, timeout: float = 2.0, *, want: int = 1) -> list[Completion]:
        """Completions of requestq ``q``: what is used now, or, if nothing
        is, what is used within ``timeout`` s (waiting for calls, and looking
        at the used ring every 50 ms in case a call is late), until at least
        ``want`` came. ProtocolError when the device uses a head that was not
        in flight."""
        queue = self.queues[q]
        out = self._done.pop(q, [])
        deadline = time.monotonic() + timeout
        while True:
            out.extend(self._reap(queue))
            left = deadline - time.monotonic()
            if len(out) >= want or left <= 0:
                return out
            self.wait_calls([queue], min(left, 0.05))

    def request(self, q: int, type: int, sector: int = 0, data: bytes = b"", in_len: int = 0, *,
                timeout: float = 5.0, **kw) -> Completion:
        """:meth:`submit` one request and wait for its completion (others
        that complete meanwhile are kept for :meth:`complete`). InspectorError
        when it is not used within ``timeout`` s."""
        head = self.submit(q, type, sector, data, in_len, **kw)
        return self.wait_head(q, head, timeout)

    def wait_head(self, q: int, head: int, timeout: float = 5.0) -> Completion:
        """Wait for the completion of ``head`` on requestq ``q``."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.complete(q, max(0.0, deadline - time.monotonic()))
            mine = [c for c in done if c.head == head]
            rest = [c for c in done if c.head != head]
            if rest:
                self._done.setdefault(q, []).extend(rest)
            if mine:
                return mine[0]
            if time.monotonic() >= deadline:
                raise InspectorError(f"requestq {q}: head {head} not completed within {timeout} s")

    def _reap(self, queue: DriverQueue) -> list[Completion]:
        out = []
        for head, used_len, slot in self._collect(queue):
            p = self._pending.pop((queue.index, head), None)
            self.free_slots.append(slot)
            if p is None:
                raise ProtocolError(f"requestq {queue.index}: the device used head {head}, not in flight")
            status = None
            if p.status_gpa is not None and used_len >= 1:
                status = self.mem.read(p.status_gpa, 1)[0]
            data = self.mem.read(p.in_gpa, min(p.in_len, used_len)) if p.in_len else b""
            out.append(Completion(head, status, data, used_len, p.type, p.sector))
        return out

    def close(self) -> None:
        self._pending.clear()
        self._done.clear()
        super().close()

