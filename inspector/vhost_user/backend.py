"""The vhost-user back-end core: one :class:`BackendConnection` per front-end.

It speaks the protocol (protocol.py, transport.py), keeps the front-end's
memory (memory_table.py), each vring's plain, untrusted state and start/stop
rule (vrings.py), the inflight areas (inflight.py), and the device's status,
config and back-end channel (status.py), and tells the device when a vring
starts and stops (inspector/devices/base.py). It never touches a ring and
has no event loop: whoever owns the socket calls
:meth:`BackendConnection.handle_readable` when it is readable and
:meth:`BackendConnection.close` when that returns False.

Structure after libvhost-user: one handler per request in a table, each
returning the reply payload or None; REPLY_ACK in one place; a protocol
violation latches ``broken`` (libvhost-user's vu_panic) after one log line,
the fds that came with the message are closed, and the connection is to be
closed. Unlike libvhost-user, every request is validated before it changes
any state (index < queue count, sizes, region overlap, fd counts...).
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import socket
import time
from typing import Any, Callable

from ..devices.base import Device, VringConfig
from ..errors import InspectorError, RequestRefused
from ..memory import GuestMemory
from ..spec.vhost import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES
from ..spec.virtio import VIRTIO_F_ACCESS_PLATFORM, has_feature
from .inflight import InflightTracking
from .iotlb import IotlbControl
from .memory_table import U64_MAX, MappedMemory, fd_size, map_fd
from .protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, VERSION, LogPayload, MemoryTable, ProtocolFeature, ProtocolViolation,
    Request, check_header, check_index, has_reply, pack_u64, payload_fields,
)
from .status import DeviceControl
from .transport import Message, MessageReader, send_message
from .vrings import Vrings, check_ring_mapped, close_fd

logger = logging.getLogger("inspector.vhost_user")

OFFERED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                             | ProtocolFeature.LOG_SHMFD | ProtocolFeature.BACKEND_REQ
                             | ProtocolFeature.STATUS)
# Offered in addition when the device says ``supports_inflight = True``:
# GET/SET_INFLIGHT_FD.
INFLIGHT_PROTOCOL_FEATURES = ProtocolFeature.INFLIGHT_SHMFD

# A front-end has this long to finish a message it began (the server checks;
# reads never block) and to take a reply off its socket (a reply is sent
# with this timeout: replies are at most 268 bytes, so only a peer that left
# ~200 KB of replies unread can make one wait, and that peer holds the
# server's loop for at most this long once).
STALL_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 0.5

MESSAGE_LOG_SIZE = 10000


class BackendConnection:
    """The back-end side of one vhost-user connection.

    ``sock``: the connected Unix stream socket (owned: closed by close()).
    ``device``: the device behind it. ``log``: a logging.Logger for the one
    line per violation (defaults to ``inspector.vhost_user``).

    Public state (read by snapshots and tests): ``device``, ``vrings`` (one
    VringConfig per device vring), ``mem`` (GuestMemory or None),
    ``features`` (acked with SET_FEATURES, as sent: may include bit 30),
    ``protocol_features``, ``broken`` / ``broken_reason``, ``log`` (the
    bounded message log: dicts {time, request, flags, size, nfds, fields}),
    ``id``, ``inflight`` (the mapped SET_INFLIGHT_FD area or None),
    ``log_map`` (the SET_LOG_BASE area or None), ``control`` (status,
    config, back-end channel: status.DeviceControl).

    The socket is made non-blocking: a message is assembled across readable
    events (:class:`~.transport.MessageReader`), so a front-end stalling
    mid-message holds no one else; :meth:`stalled` tells the owner when it
    has held a partial message longer than ``stall_timeout`` seconds.
    Replies are sent with a ``reply_timeout``.
    """

    def __init__(self, sock: socket.socket, device: Device, log: logging.Logger | None = None, *,
                 conn_id: int = 0, log_size: int = MESSAGE_LOG_SIZE,
                 stall_timeout: float = STALL_TIMEOUT_S, reply_timeout: float = REPLY_TIMEOUT_S):
        self.sock = sock
        sock.setblocking(False)
        self.stall_timeout = stall_timeout
        self.reply_timeout = reply_timeout
        self._reader = MessageReader()
        self.device = device
        self.logger = log or logger
        self.id = conn_id
        self.log: collections.deque[dict] = collections.deque(maxlen=log_size)
        self.num_queues = int(device.num_queues)
        self.memory = MappedMemory(self.logger, conn_id)
        self.rings = Vrings(device, self.memory, self.logger, conn_id, features=lambda: self.features)
        self.inflight_areas = InflightTracking(device, self.num_queues, self._negotiated, self.logger, conn_id)
        self.control = DeviceControl(device, self._negotiated, self.logger, conn_id)
        self.iotlb = IotlbControl(device, self.rings, self.control.send_iotlb_miss, self.logger, conn_id)
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.owner = False
        self.log_map: mmap.mmap | None = None
        self.log_call_fd: int | None = None
        self.broken = False
        self.broken_reason: str | None = None
        self.closed = False
        self.messages = 0
        device.on_needs_reset = self.control.needs_reset_hook
        rings, inflight, control = self.rings, self.inflight_areas, self.control
        self._handlers: dict[Request, Callable[[Message, Any], Any]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_device,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: rings.set_num,
            Request.SET_VRING_ADDR: rings.set_addr,
            Request.SET_VRING_BASE: rings.set_base,
            Request.GET_VRING_BASE: rings.get_base,
            Request.SET_VRING_KICK: rings.set_kick,
            Request.SET_VRING_CALL: rings.set_call,
            Request.SET_VRING_ERR: rings.set_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: rings.set_enable,
            Request.SET_BACKEND_REQ_FD: control.set_backend_req_fd,
            Request.GET_CONFIG: control.get_config,
            Request.SET_CONFIG: control.set_config,
            Request.GET_INFLIGHT_FD: inflight.get_fd,
            Request.SET_INFLIGHT_FD: inflight.set_fd,
            Request.SET_STATUS: control.set_status,
            Request.GET_STATUS: control.get_status,
            Request.IOTLB_MSG: self.iotlb.handle,
        }

    @property
    def mem(self) -> GuestMemory | None:
        """The front-end's memory (the current SET_MEM_TABLE), or None."""
        return self.memory.mem

    @property
    def vrings(self) -> list[VringConfig]:
        """One VringConfig per device vring (vrings.Vrings.configs)."""
        return self.rings.configs

    @property
    def inflight(self) -> mmap.mmap | None:
        """The mapped SET_INFLIGHT_FD area in use, or None."""
        return self.inflight_areas.area

    @property
    def backend_req_fd(self) -> int | None:
        """The SET_BACKEND_REQ_FD channel's fd, or None."""
        return self.control.backend_req_fd

    def send_config_change(self) -> bool:
        """:meth:`status.DeviceControl.send_config_change`."""
        return self.control.send_config_change()

    def _negotiated(self) -> int:
        return self.protocol_features

    # --- entry points ------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_readable(self) -> bool:
        """Read what the socket has and handle the message once complete (at
        most one per call; a partial message waits for the next readable
        event). False when the connection is over (peer closed, I/O error or
        protocol violation): call close()."""
        if self.broken or self.closed:
            return False
        try:
            msg = self._reader.feed(self.sock)
        except ProtocolViolation as e:
            self._break(e)
            return False
        except OSError as e:
            self.logger.info("connection %d: read failed: %s; closing", self.id, e)
            return False
        if msg is None:
            if self._reader.eof:
                self.logger.debug("connection %d: front-end closed the connection", self.id)
                return False
            return True
        self.messages += 1
        return self.handle_message(msg)

    def stalled(self, now: float | None = None) -> bool:
        """True (after breaking the connection with one log line) when the
        front-end began a message more than ``stall_timeout`` seconds before
        ``now`` (time.monotonic()) and has not finished it: close() it."""
        started = self._reader.started
        if started is None or self.broken or self.closed:
            return False
        if (time.monotonic() if now is None else now) - started <= self.stall_timeout:
            return False
        e = self._reader.stall_violation()
        self._reader.close()
        self._break(ProtocolViolation(e.request, e.field, e.value, f"{e.why} for more than "
                                      f"{self.stall_timeout:g} s"))
        return True

    def handle_message(self, msg: Message) -> bool:
        """Validate, log and dispatch one message; owns ``msg.fds``."""
        entry = {"time": time.time(), "request": msg.name, "flags": msg.flags, "size": msg.size,
                 "nfds": len(msg.fds), "fields": {}}
        self.log.append(entry)
        need_reply = bool(msg.flags & FLAG_NEED_REPLY)
        try:
            if self.broken:
                raise ProtocolViolation(msg.name, "connection", "broken",
                                        f"refused: earlier violation ({self.broken_reason})")
            req, payload = check_header(msg)
            entry["fields"] = payload_fields(payload)
            check_index(req, payload, self.num_queues)
            reply = self._handlers.get(req, self._unsupported)(msg, payload)
        except ProtocolViolation as e:
            msg.close_fds()
            entry["error"] = str(e)
            self._break(e)
            if need_reply and msg.request in Request._value2member_map_:
                self._reply_quietly(msg.request, pack_u64(1))
            return False
        except RequestRefused as e:
            msg.close_fds()
            entry["error"] = str(e)
            self.logger.warning("connection %d: %s", self.id, e)
            if need_reply:
                return self._reply(msg.request, pack_u64(1))
            return True
        except Exception as e:
            # The device refused (start_queue on a ring it cannot service...)
            # or failed: the connection cannot go on consistently.
            msg.close_fds()
            entry["error"] = str(e)
            if not isinstance(e, InspectorError):
                self.logger.debug("connection %d: device failure", self.id, exc_info=True)
            self._break(ProtocolViolation(msg.name, "device", self.device.name,
                                          f"{type(e).__name__}: {e}"))
            return False
        msg.close_fds()  # anything a handler did not take
        if isinstance(reply, tuple):  # (payload, fds to send and close)
            return self._reply(req, *reply)
        if reply is not None:
            return self._reply(req, reply)
        if need_reply:  # REPLY_ACK (spec "REPLY_ACK"): 0 is success
            return self._reply(req, pack_u64(0))
        return True

    def close(self) -> None:
        """Stop every vring, close the device, every fd and mapping, and the
        socket. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.control.closed = True  # a queue breaking from now on sends nothing
        self.rings.stop_all()
        try:
            self.device.close()
        except Exception as e:
            self.logger.warning("connection %d: device close failed: %s", self.id, e)
        self.rings.close()
        self.iotlb.close()
        self.memory.close()
        self._close_log()
        self.inflight_areas.close()
        self._reader.close()
        self.control.close()
        try:
            self.sock.close()
        except OSError:
            pass

    # --- plumbing -------------------------------------------------------------
    def _break(self, e: ProtocolViolation) -> None:
        self.broken = True
        self.broken_reason = str(e)
        self.logger.error("connection %d: protocol violation: %s; closing the connection", self.id, e)

    def _send_reply(self, request: int, payload: bytes, fds=()) -> None:
        """Send a reply, waiting at most ``reply_timeout`` for room in the
        socket; the socket stays non-blocking for reads."""
        self.sock.settimeout(self.reply_timeout)
        try:
            send_message(self.sock, request, payload, fds=fds, flags=VERSION | FLAG_REPLY)
        finally:
            self.sock.setblocking(False)

    def _reply(self, request: int, payload: bytes, fds=()) -> bool:
        """Send a reply; ``fds`` go with it and are closed here, sent or not."""
        try:
            self._send_reply(request, payload, fds)
        except OSError as e:
            self.logger.info("connection %d: reply to %s failed: %s; closing", self.id,
                             Request(request).name, e)
            return False
        finally:
            for fd in fds:
                close_fd(fd)
        return True

    def _reply_quietly(self, request: int, payload: bytes) -> None:
        try:
            self._send_reply(request, payload)
        except OSError:
            pass

    def _unsupported(self, msg: Message, payload: Any) -> None:
        raise ProtocolViolation(msg.name, "request", msg.request,
                                "not supported by this back-end (its protocol feature was not offered)")

    # --- handlers: each returns the reply payload or None ------------------------
    def _offered_features(self) -> int:
        # VIRTIO_F_ACCESS_PLATFORM: the core translates IOVAs for every device (iotlb.py).
        return ((int(self.device.features()) & ~(1 << VHOST_F_LOG_ALL)) | 1 << VHOST_USER_F_PROTOCOL_FEATURES
                | 1 << VIRTIO_F_ACCESS_PLATFORM)

    def _offered_protocol_features(self) -> int:
        offered = int(OFFERED_PROTOCOL_FEATURES)
        if self.device.supports_inflight:
            offered |= int(INFLIGHT_PROTOCOL_FEATURES)
        return offered

    @staticmethod
    def _check_offered(name: str, field: str, acked: int, offered: int) -> None:
        """A front-end acks only bits that were offered (SET_FEATURES, SET_PROTOCOL_FEATURES)."""
        if acked & ~offered:
            raise ProtocolViolation(name, field, acked,
                                    f"bits {acked & ~offered:#x} were never offered (offered {offered:#x})")

    def _get_features(self, msg: Message, _: None) -> bytes:
        return pack_u64(self._offered_features())

    def _set_features(self, msg: Message, features: int) -> None:
        self._check_offered(msg.name, "features", features, self._offered_features())
        if self.rings.running() and (has_feature(features, VIRTIO_F_ACCESS_PLATFORM)
                                     != has_feature(self.features, VIRTIO_F_ACCESS_PLATFORM)):
            raise ProtocolViolation(msg.name, "features", features,
                                    "VIRTIO_F_ACCESS_PLATFORM changed while vrings run (their addresses "
                                    "would change meaning)")
        self.features = features
        self.features_set = True
        self.device.set_features(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VIRTIO_F_ACCESS_PLATFORM))
        self.iotlb.set_features(features, self.memory.mem)
        if not has_feature(features, VHOST_USER_F_PROTOCOL_FEATURES):
            self.rings.enable_all(msg.name)  # spec: without protocol features, rings start enabled

    def _get_protocol_features(self, msg: Message, _: None) -> bytes:
        return pack_u64(self._offered_protocol_features())

    def _set_protocol_features(self, msg: Message, features: int) -> None:
        self._check_offered(msg.name, "protocol_features", features, self._offered_protocol_features())
        self.protocol_features = features

    def _set_owner(self, msg: Message, _: None) -> None:
        self.owner = True

    def _reset_device(self, msg: Message, _: None) -> None:
        """RESET_OWNER (deprecated) and RESET_DEVICE: every vring back to its
        initial state (stopped, no fds); memory table and features stay."""
        self.rings.reset(self.features_set and not has_feature(self.features, VHOST_USER_F_PROTOCOL_FEATURES))
        self.control.reset()

    def _get_queue_num(self, msg: Message, _: None) -> bytes:
        """What the front-end compares its queue count with (Device.queue_num)."""
        return pack_u64(int(self.device.queue_num()))

    def _set_mem_table(self, msg: Message, table: MemoryTable) -> None:
        """Map the new table (memory_table.py validates it first), check the
        running rings are still inside it, then stop them, swap the tables
        and start every ready ring on the new one."""
        name = msg.name
        new = self.memory.map(name, table.regions, msg.fds)
        running = self.rings.running()
        try:
            for i in running:  # rings that keep running must still be mapped (IOVAs: re-translated)
                if self.iotlb.iotlb is None:
                    check_ring_mapped(name, self.vrings[i], new.mem)
        except BaseException:
            new.close()
            raise
        msg.close_fds()  # the mappings hold the memory; the fds are not needed
        # Stop the rings that use the old table before unmapping it.
        for i in running:
            self.rings.stop(i)
        self.iotlb.set_memory(new.mem)   # its host pointers are into the old mappings
        self.memory.install(new)
        self.rings.start_all(name)

    def _set_log_base(self, msg: Message, log: LogPayload) -> bytes | None:
        """Dirty logging is never offered (no VHOST_F_LOG_ALL): nothing is
        ever written to the log area, so it is mapped read-only, as the spec
        asks it to be mapped, and otherwise ignored."""
        name = msg.name
        fd = msg.take_fd()
        try:
            if log.mmap_size == 0:
                raise ProtocolViolation(name, "mmap_size", 0, "the log area cannot be empty")
            if log.mmap_offset + log.mmap_size - 1 > U64_MAX:
                raise ProtocolViolation(name, "mmap_offset", log.mmap_offset,
                                        f"+ mmap_size {log.mmap_size:#x} overflows 64 bits")
            size = fd_size(name, "fd", fd)
            if log.mmap_offset + log.mmap_size > size:
                raise ProtocolViolation(name, "mmap_size", log.mmap_size,
                                        f"with mmap_offset {log.mmap_offset:#x} does not fit the fd "
                                        f"({size:#x} bytes)")
            m = map_fd(name, "fd", fd, log.mmap_offset, log.mmap_size, writable=False).map
        finally:
            os.close(fd)
        self._unmap_log()
        self.log_map = m
        return pack_u64(0) if has_reply(Request.SET_LOG_BASE, self.protocol_features) else None

    def _set_log_fd(self, msg: Message, _: None) -> None:
        close_fd(self.log_call_fd)
        self.log_call_fd = msg.take_fd()

    def _unmap_log(self) -> None:
        if self.log_map is not None:
            try:
                self.log_map.close()
            except BufferError:
                pass
            self.log_map = None

    def _close_log(self) -> None:
        self._unmap_log()
        self.log_call_fd = close_fd(self.log_call_fd)
