"""What a vhost-user proxy knows of one connection, from the messages that
pass (inspector/vhost_user/proxy.py): features, protocol features, the
memory table mapped read-only, each vring's size, addresses, base, enable
state and whether it runs, the device status, whether GET_CONFIG was seen.

Every message is decoded with protocol.py (:func:`~.protocol.check_header`
for requests, :func:`~.protocol.decode_reply` for replies); one that fails
is reported to the caller as a :class:`~.protocol.ProtocolViolation` (the
proxy forwards it anyway and logs it once) and changes nothing here.

Guest memory is mapped PROT_READ from dups of the region fds
(memory_table.MappedMemory with ``writable=False``): the proxy never writes
guest memory. A new table (SET_MEM_TABLE), a region added or removed
(ADD_MEM_REG / REM_MEM_REG) remaps; :meth:`ConnectionState.close` unmaps
and closes everything. What this cannot know: the back-end's private
positions (last_avail_idx, a packed ring's device positions): it never asks
(no GET_VRING_BASE, ever).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from ..datapath.iotlb import Iotlb, IotlbRejected
from ..devices.base import VringConfig
from ..spec.vhost import VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE
from ..memory import GuestMemory
from ..spec.virtio import (VIRTIO_BLK_F_GEOMETRY, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_NET_F_CSUM,
                           VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN,
                           VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                           VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, has_feature)
from .memory_table import MappedMemory
from .protocol import (FLAG_REPLY, VERSION, VERSION_MASK, VRING_IDX_MASK, BackendRequest, IotlbMsg,
                       MemoryRegionDesc, ProtocolViolation, Request, VringAddr, VringState,
                       check_header, decode_reply, REPLY_KINDS, payload_fields, request_name, unpack_mem_reg, unpack_u64,
                       unpack_vring_state)

#: The most vrings a connection's state tracks (QEMU's VIRTIO_QUEUE_MAX);
#: a message naming a vring beyond it is malformed for the proxy.
MAX_VRINGS = 1024

#: Feature bits only a virtio-net device has (VIRTIO 1.2 §5.1.3), and only
#: a virtio-blk device has (§5.2.3): how the device type is inferred.
_NET_ONLY = [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MTU, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
             VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN,
             VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_MAC_ADDR]
_BLK_ONLY = [VIRTIO_BLK_F_GEOMETRY]


def _check_flags(name: str, flags: int, reply: bool) -> None:
    if flags & VERSION_MASK != VERSION:
        raise ProtocolViolation(name, "flags.version", flags & VERSION_MASK, f"only version {VERSION} exists")
    if reply and not flags & FLAG_REPLY:
        raise ProtocolViolation(name, "flags", flags, "a reply without the REPLY bit (0x4)")
    if not reply and flags & FLAG_REPLY:
        raise ProtocolViolation(name, "flags", flags, "the REPLY bit (0x4) is set in a request")


def decode_request(frame) -> tuple[Request, Any]:
    """(request, payload) of a front-end's message (``frame``: request,
    flags, payload, fds); ProtocolViolation naming what is wrong.
    ADD_MEM_REG / REM_MEM_REG carry one region (and ADD_MEM_REG its fd; QEMU
    sends REM_MEM_REG's too, libvhost-user wants it)."""
    if frame.request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        req = Request(frame.request)
        _check_flags(req.name, frame.flags, reply=False)
        region = unpack_mem_reg(req.name, frame.payload)
        allowed = (1,) if req == Request.ADD_MEM_REG else (0, 1)
        if len(frame.fds) not in allowed:
            raise ProtocolViolation(req.name, "fds", len(frame.fds), "this request carries 1 fd")
        return req, region
    return check_header(frame)


def decode_backend_message(frame, reply: bool) -> tuple[Any, Any]:
    """(BackendRequest or Request, payload) of a message on the back-end
    request channel (``reply``: the front-end's REPLY_ACK, a u64)."""
    name = _backend_name(frame.request)
    _check_flags(name, frame.flags, reply)
    try:
        req = BackendRequest(frame.request)
    except ValueError:
        raise ProtocolViolation(name, "request", frame.request, "unknown back-end request number") from None
    if reply:
        return req, unpack_u64(name, frame.payload) if frame.payload else None
    if req in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
        return req, unpack_vring_state(name, frame.payload)
    return req, None


def _backend_name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"UNKNOWN({request})"


def message_name(direction: str, request: int) -> str:
    """The request's name as the message log shows it in ``direction``."""
    return _backend_name(request) if direction.startswith("backend-req") else request_name(request)


class ConnectionState:
    """One proxied connection's device state, as the messages say it.

    ``features`` (SET_FEATURES, None until then), ``device_features``
    (GET_FEATURES' reply), ``protocol_features`` (SET_PROTOCOL_FEATURES),
    ``offered_protocol_features`` (its reply), ``vrings`` (index ->
    VringConfig: ``started`` = kick received and no GET_VRING_BASE since;
    fds are never kept here), ``status`` (SET_STATUS), ``config_seen``
    (GET_CONFIG passed), ``mem`` (GuestMemory mapped PROT_READ, or None).
    """

    def __init__(self, logger: logging.Logger, conn_id: int):
        self.id = conn_id
        self.features: int | None = None
        self.device_features: int | None = None
        self.protocol_features: int | None = None
        self.offered_protocol_features: int | None = None
        self.vrings: dict[int, VringConfig] = {}
        self.status: int | None = None
        self.config_seen = False
        self.resets = 0
        self._memory = MappedMemory(logger, conn_id)
        self._regions: list[tuple[MemoryRegionDesc, int]] = []   # the table, each region with our dup of its fd
        #: VIRTIO_F_ACCESS_PLATFORM acked: a mirror of the IOTLB the front-end
        #: gives the back-end (its UPDATE / INVALIDATE messages), to read the
        #: rings at their IOVAs; None otherwise.
        self.iotlb: Iotlb | None = None

    @property
    def mem(self) -> GuestMemory | None:
        return self._memory.mem

    @property
    def packed(self) -> bool:
        return self.features is not None and has_feature(self.features, VIRTIO_F_RING_PACKED)

    def device_type(self) -> str | None:
        """"block" (GET_CONFIG seen, or a virtio-blk-only feature), "net" (a
        virtio-net-only feature offered or acked), else None."""
        if self.config_seen:
            return "block"
        bits = (self.features or 0) | (self.device_features or 0)
        if any(has_feature(bits, b) for b in _NET_ONLY):
            return "net"
        if any(has_feature(bits, b) for b in _BLK_ONLY):
            return "block"
        return None

    def vring(self, name: str, index: int) -> VringConfig:
        if index >= MAX_VRINGS:
            raise ProtocolViolation(name, "index", index, f"beyond the {MAX_VRINGS} vrings a device may have")
        if index not in self.vrings:
            self.vrings[index] = VringConfig(index)
        return self.vrings[index]

    # --- messages ------------------------------------------------------------------
    def front_end_message(self, frame) -> dict:
        """Apply a front-end's request; its decoded fields for the message
        log. ProtocolViolation (state unchanged) when it is malformed."""
        req, payload = decode_request(frame)
        name = req.name
        if isinstance(payload, (VringState, VringAddr)) or req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                                                   Request.SET_VRING_ERR):
            index = payload.index if not isinstance(payload, int) else payload & VRING_IDX_MASK
            self._vring_request(req, self.vring(name, index), payload)
        elif req == Request.SET_FEATURES:
            self.features = payload
            self._iotlb_features(payload)
        elif req == Request.IOTLB_MSG:
            self._iotlb_message(payload)
        elif req == Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = payload
        elif req == Request.SET_MEM_TABLE:
            self._set_table(name, [(r, fd) for r, fd in zip(payload.regions, frame.fds)])
        elif req == Request.ADD_MEM_REG:
            self._set_table(name, [(r, None) for r, _ in self._regions] + [(payload, frame.fds[0])])
        elif req == Request.REM_MEM_REG:
            keep = [(r, None) for r, _ in self._regions
                    if (r.guest_phys_addr, r.memory_size) != (payload.guest_phys_addr, payload.memory_size)]
            if len(keep) == len(self._regions):
                raise ProtocolViolation(name, "guest_phys_addr", payload.guest_phys_addr,
                                        f"no region of {payload.memory_size:#x} bytes there to remove")
            self._set_table(name, keep)
        elif req in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self.vrings = {}
            self.resets += 1
        elif req == Request.SET_STATUS:
            self.status = payload
        elif req == Request.GET_CONFIG:
            self.config_seen = True
        if isinstance(payload, MemoryRegionDesc):
            return dict(vars(payload))
        return payload_fields(payload)

    @staticmethod
    def _vring_request(req: Request, vring: VringConfig, payload) -> None:
        if req == Request.SET_VRING_NUM:
            vring.num = payload.num
        elif req == Request.SET_VRING_BASE:
            vring.base = payload.num
        elif req == Request.SET_VRING_ADDR:
            vring.desc_uva, vring.used_uva, vring.avail_uva = (payload.desc_user_addr, payload.used_user_addr,
                                                               payload.avail_user_addr)
            vring.addr_flags, vring.log_guest_addr, vring.addr_set = payload.flags, payload.log_guest_addr, True
        elif req == Request.SET_VRING_ENABLE:
            vring.enabled = payload.num != 0
        elif req == Request.SET_VRING_KICK:
            vring.started = True          # with an fd, or polling (bit 8: VRING_NOFD_MASK)
        elif req == Request.GET_VRING_BASE:
            vring.started = False

    def back_end_message(self, frame) -> dict:
        """Apply a back-end's reply; its decoded fields. ProtocolViolation
        (state unchanged) when it is malformed."""
        name = f"{request_name(frame.request)} reply"
        _check_flags(name, frame.flags, reply=True)
        try:
            req = Request(frame.request)
        except ValueError:
            raise ProtocolViolation(name, "request", frame.request, "unknown request number") from None
        if req == Request.GET_CONFIG and not frame.payload:
            self.config_seen = True
            return {"failed": True}        # libvhost-user's way of saying GET_CONFIG failed
        if len(frame.payload) == 8 and REPLY_KINDS.get(req, "state") != "state":
            # A u64 status instead of the reply (a back-end refusing a
            # request it found malformed, as libvhost-user and serve do).
            # Not for GET_VRING_BASE: its reply, a vring state, is 8 bytes.
            return {"u64": unpack_u64(name, frame.payload)}
        payload = decode_reply(req, frame.payload)
        if req == Request.GET_FEATURES:
            self.device_features = payload
        elif req == Request.GET_PROTOCOL_FEATURES:
            self.offered_protocol_features = payload
        elif req == Request.GET_CONFIG:
            self.config_seen = True
        elif req == Request.GET_VRING_BASE and payload.index in self.vrings:
            self.vrings[payload.index].started = False
        return payload_fields(payload)

    # --- memory ----------------------------------------------------------------------
    def _set_table(self, name: str, regions: list[tuple[MemoryRegionDesc, int | None]]) -> None:
        """Map ``regions`` (each with a received fd to dup, or None: one of
        ours already) read-only as the new table; the old one is unmapped.
        ProtocolViolation with the old table kept when it cannot be."""
        ours = {id(r): fd for r, fd in self._regions}
        fds: list[int] = []
        try:
            for r, fd in regions:
                fds.append(os.dup(fd) if fd is not None else os.dup(ours[id(r)]))
        except OSError as e:
            _close(fds)
            raise ProtocolViolation(name, "fds", len(regions), f"dup failed: {e.strerror}") from None
        descs = [r for r, _ in regions]
        try:
            table = self._memory.map(name, descs, fds, writable=False)
        except ProtocolViolation:
            _close(fds)
            raise
        if self.iotlb is not None:
            self.iotlb.set_memory(table.mem)   # as the back-end does: a new table flushes its IOTLB
        self._memory.install(table)
        _close([fd for _, fd in self._regions])
        self._regions = list(zip(descs, fds))

    # --- VIRTIO_F_ACCESS_PLATFORM --------------------------------------------------------
    def _iotlb_features(self, features: int) -> None:
        """Mirror the connection's IOTLB while VIRTIO_F_ACCESS_PLATFORM is acked."""
        if has_feature(features, VIRTIO_F_ACCESS_PLATFORM):
            if self.iotlb is None:
                self.iotlb = Iotlb(mirror=True)
                self.iotlb.set_memory(self.mem)
        elif self.iotlb is not None:
            self.iotlb.close()
            self.iotlb = None

    def _iotlb_message(self, m) -> None:
        """An IOTLB_MSG the front-end sent: applied to the mirror as a
        back-end would (an UPDATE it refuses is counted in the mirror's
        ``rejected``; the back-end decides for itself, the proxy only
        watches)."""
        if self.iotlb is None or not isinstance(m, IotlbMsg):
            return
        try:
            if m.type == VHOST_IOTLB_UPDATE:
                self.iotlb.update(m.iova, m.size, m.uaddr, m.perm)
            elif m.type == VHOST_IOTLB_INVALIDATE:
                self.iotlb.invalidate(m.iova, m.size)
        except IotlbRejected:
            pass

    def backend_request(self, req, payload) -> None:
        """A message the back-end sent on its request channel: IOTLB misses are counted."""
        if req == BackendRequest.IOTLB_MSG and self.iotlb is not None:
            self.iotlb.misses_sent += 1

    def close(self) -> None:
        """Unmap guest memory and close every fd kept."""
        if self.iotlb is not None:
            self.iotlb.close()
            self.iotlb = None
        self._memory.close()
        _close([fd for _, fd in self._regions])
        self._regions = []
        self.vrings = {}

    def snapshot_vrings(self) -> list[VringConfig]:
        """Copies of the vrings that have a size and addresses, by index,
        ``packed`` set from the acked features."""
        packed = self.packed
        return [replace(v, packed=packed) for _, v in sorted(self.vrings.items()) if v.addr_set and v.num]


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


