"""The vhost-user back-end core: one :class:`BackendConnection` per front-end.

It speaks the protocol (inspector/vhost_user/protocol.py), keeps each vring's
plain, untrusted state in a VringConfig, maps the front-end's memory and tells
the device when a vring starts and stops (inspector/devices/base.py). It never
touches a ring and has no event loop: whoever owns the socket calls
:meth:`BackendConnection.handle_readable` when it is readable and
:meth:`BackendConnection.close` when that returns False.

Structure after libvhost-user (shared/seeds/001_*): one handler per request in
a table, each returning the reply payload or None; REPLY_ACK in one place; a
protocol violation latches ``broken`` (libvhost-user's vu_panic) after one log
line, the fds that came with the message are closed, and the connection is to
be closed. Unlike libvhost-user, every request is validated before it changes
any state (index < queue count, sizes, region overlap, fd counts...).

Vring start rule (spec "Starting and stopping rings"): a vring is started when
it has a kick fd (or polling was asked for with the no-fd bit), a size and
addresses, the memory table is known, and it is enabled. Rings are enabled at
once when VHOST_USER_F_PROTOCOL_FEATURES was not negotiated, otherwise only by
SET_VRING_ENABLE 1. GET_VRING_BASE stops a vring (and drops its kick and call
fds, as libvhost-user and DPDK do); so do RESET_OWNER / RESET_DEVICE and a
disconnect. A change of fd, address, size or memory table on a started vring
stops it (taking its last_avail_idx as the new base) and starts it again, so a
device never uses an fd or a mapping the core has closed.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import mmap
import os
import socket
import time
from typing import Any, Callable

from ..devices.base import Device, VringConfig
from ..errors import InspectorError, MemoryAccessError
from ..layout import avail_ring_size, desc_table_size, is_power_of_two, used_ring_size
from ..memory import GuestMemory
from ..layout import inflight_queue_size
from ..spec.vhost import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES
from ..spec.virtio import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTQ_MAX_SIZE, has_feature
from .protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, VERSION, VRING_IDX_MASK, VRING_NOFD_MASK, ConfigPayload,
    InflightPayload, LogPayload, MemoryTable, Message, MessageReader, ProtocolFeature,
    ProtocolViolation, Request, VringAddr, VringState, check_header, check_index, pack_u64,
    payload_fields, send_message,
)

logger = logging.getLogger("inspector.vhost_user")

OFFERED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
                             | ProtocolFeature.LOG_SHMFD | ProtocolFeature.BACKEND_REQ
                             | ProtocolFeature.STATUS)
# Offered in addition when the device says ``supports_inflight = True`` (and
# has ``set_inflight``): GET/SET_INFLIGHT_FD.
INFLIGHT_PROTOCOL_FEATURES = ProtocolFeature.INFLIGHT_SHMFD

# A front-end has this long to finish a message it began (the server checks;
# reads never block) and to take a reply off its socket (a reply is sent
# with this timeout: replies are at most 268 bytes, so only a peer that left
# ~200 KB of replies unread can make one wait, and that peer holds the
# server's loop for at most this long once).
STALL_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 0.5

MESSAGE_LOG_SIZE = 10000
_PAGE = mmap.ALLOCATIONGRANULARITY
_U64_MAX = (1 << 64) - 1


class _Failed(Exception):
    """A request that failed without breaking the protocol (a device refused
    a config write): REPLY_ACK answers non-zero, the connection lives on."""


class _Mapping:
    """One mmap of a front-end memory region; closes robustly."""

    def __init__(self, fd: int, offset: int, size: int, *, writable: bool = True):
        start = offset - offset % _PAGE
        self.buf_offset = offset - start
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, size + self.buf_offset, mmap.MAP_SHARED, prot, offset=start)

    def close(self) -> bool:
        """Unmap; False while some buffer still exports it (retry later)."""
        try:
            self.map.close()
            return True
        except BufferError:
            return False


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
    ``id``, ``inflight`` (the mapped SET_INFLIGHT_FD area or None).

    The socket is made non-blocking: a message is assembled across readable
    events (:class:`~.protocol.MessageReader`), so a front-end stalling
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
        self.vrings = [VringConfig(index=i) for i in range(self.num_queues)]
        self._polling = [False] * self.num_queues  # kick "fd" is the no-fd bit
        self.mem: GuestMemory | None = None
        self._maps: list[_Mapping] = []
        self._stale_maps: list[_Mapping] = []
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.owner = False
        self.log_map: mmap.mmap | None = None
        self.log_call_fd: int | None = None
        self.backend_req_fd: int | None = None
        self.inflight: mmap.mmap | None = None
        self._stale_inflight: list[mmap.mmap] = []
        self.broken = False
        self.broken_reason: str | None = None
        self.closed = False
        self.messages = 0
        # SET_STATUS / GET_STATUS (PROTOCOL_F_STATUS): the driver's status byte,
        # and the reason the device needs a reset (a queue broke), if it does.
        self.device_status = 0
        self.needs_reset: str | None = None
        if hasattr(device, "on_needs_reset"):
            device.on_needs_reset = self._on_needs_reset
        self._handlers: dict[Request, Callable[[Message, Any], bytes | None]] = {
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
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }

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
        except _Failed as e:
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
        for i in range(self.num_queues):
            try:
                self._stop(i)
            except Exception as e:  # a failing device must not leak our fds
                self.logger.warning("connection %d: stop_queue(%d) failed: %s", self.id, i, e)
        try:
            self.device.close()
        except Exception as e:
            self.logger.warning("connection %d: device close failed: %s", self.id, e)
        for i in range(self.num_queues):
            self._drop_vring_fds(i, kick=True, call=True, err=True)
        self._unmap_all()
        self._close_log()
        self._close_inflight()
        self._reader.close()
        self.backend_req_fd = _close(self.backend_req_fd)
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
                _close(fd)
        return True

    def _reply_quietly(self, request: int, payload: bytes) -> None:
        try:
            self._send_reply(request, payload)
        except OSError:
            pass

    def _unsupported(self, msg: Message, payload: Any) -> None:
        raise ProtocolViolation(msg.name, "request", msg.request,
                                "not supported by this back-end (its protocol feature was not offered)")

    def _ready(self, i: int) -> bool:
        v = self.vrings[i]
        return (not v.started and v.enabled and v.addr_set and v.num > 0 and self.mem is not None
                and (v.kick_fd is not None or self._polling[i]))

    def _check_ring_mapped(self, name: str, v: VringConfig, mem: GuestMemory) -> None:
        """Each ring area must lie inside one region (VIRTIO 1.2 §2.7: sizes
        16·N, 6+2·N, 6+8·N)."""
        for fld, addr, size in (("desc_user_addr", v.desc_uva, desc_table_size(v.num)),
                                ("avail_user_addr", v.avail_uva, avail_ring_size(v.num)),
                                ("used_user_addr", v.used_uva, used_ring_size(v.num))):
            try:
                mem.uva_to_gpa(addr, size)
            except MemoryAccessError as e:
                raise ProtocolViolation(name, f"vring[{v.index}].{fld}", addr,
                                        f"ring area of {size} bytes is not mapped: {e}") from None

    def _maybe_start(self, name: str, i: int) -> None:
        if not self._ready(i):
            return
        v = self.vrings[i]
        self._check_ring_mapped(name, v, self.mem)
        v.started = True
        try:
            self.device.start_queue(v, self.mem)
        except BaseException:
            v.started = False
            raise
        self.logger.debug("connection %d: vring %d started (num %d, base %d)", self.id, i, v.num, v.base)

    def _stop(self, i: int) -> int:
        """Stop vring ``i`` if started; return its last_avail_idx (kept as base)."""
        v = self.vrings[i]
        if v.started:
            v.started = False
            base = self.device.stop_queue(i)
            v.base = int(base) & 0xFFFF
            self.logger.debug("connection %d: vring %d stopped at %d", self.id, i, v.base)
        return v.base

    def _reconfigure(self, name: str, i: int, apply: Callable[[VringConfig], None]) -> None:
        """Apply a change to vring ``i``: stop it if running, change, start again if ready."""
        self._stop(i)
        apply(self.vrings[i])
        self._maybe_start(name, i)

    def _drop_vring_fds(self, i: int, *, kick=False, call=False, err=False) -> None:
        v = self.vrings[i]
        if kick:
            v.kick_fd = _close(v.kick_fd)
            self._polling[i] = False
        if call:
            v.call_fd = _close(v.call_fd)
        if err:
            v.err_fd = _close(v.err_fd)

    def _unmap_all(self) -> None:
        for m in self._maps + self._stale_maps:
            if not m.close():
                self.logger.warning("connection %d: a memory region is still in use; it will be "
                                    "unmapped when its last user releases it", self.id)
        self._stale_maps = []
        self._maps = []
        self.mem = None

    def _close_inflight(self) -> None:
        maps = self._stale_inflight + ([self.inflight] if self.inflight is not None else [])
        for m in maps:
            try:
                m.close()
            except BufferError:
                self.logger.warning("connection %d: the inflight area is still in use; it will be "
                                    "unmapped when its last user releases it", self.id)
        self.inflight = None
        self._stale_inflight = []

    def _close_log(self) -> None:
        if self.log_map is not None:
            try:
                self.log_map.close()
            except BufferError:
                pass
            self.log_map = None
        self.log_call_fd = _close(self.log_call_fd)

    # --- handlers: each returns the reply payload or None ------------------------
    def _offered_features(self) -> int:
        return (int(self.device.features()) & ~(1 << VHOST_F_LOG_ALL)) | 1 << VHOST_USER_F_PROTOCOL_FEATURES

    def _get_features(self, msg: Message, _: None) -> bytes:
        return pack_u64(self._offered_features())

    def _set_features(self, msg: Message, features: int) -> None:
        offered = self._offered_features()
        if features & ~offered:
            raise ProtocolViolation(msg.name, "features", features,
                                    f"bits {features & ~offered:#x} were never offered (offered {offered:#x})")
        self.features = features
        self.features_set = True
        self.device.set_features(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        if not has_feature(features, VHOST_USER_F_PROTOCOL_FEATURES):
            # Spec: without protocol features, rings start in the enabled state.
            for i, v in enumerate(self.vrings):
                if not v.enabled:
                    v.enabled = True
                    self._maybe_start(msg.name, i)

    def _offered_protocol_features(self) -> int:
        offered = int(OFFERED_PROTOCOL_FEATURES)
        if getattr(self.device, "supports_inflight", False) and hasattr(self.device, "set_inflight"):
            offered |= int(INFLIGHT_PROTOCOL_FEATURES)
        return offered

    def _get_protocol_features(self, msg: Message, _: None) -> bytes:
        return pack_u64(self._offered_protocol_features())

    def _set_protocol_features(self, msg: Message, features: int) -> None:
        offered = self._offered_protocol_features()
        if features & ~offered:
            raise ProtocolViolation(msg.name, "protocol_features", features,
                                    f"bits {features & ~offered:#x} were never offered (offered {offered:#x})")
        self.protocol_features = features

    def _set_owner(self, msg: Message, _: None) -> None:
        self.owner = True

    def _reset_device(self, msg: Message, _: None) -> None:
        """RESET_OWNER (deprecated) and RESET_DEVICE: every vring back to its
        initial state (stopped, no fds); memory table and features stay."""
        for i in range(self.num_queues):
            self._stop(i)
            self._drop_vring_fds(i, kick=True, call=True, err=True)
            self.vrings[i] = VringConfig(index=i, enabled=self._initially_enabled())
        self.device_status, self.needs_reset = 0, None

    def _initially_enabled(self) -> bool:
        return self.features_set and not has_feature(self.features, VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_mem_table(self, msg: Message, table: MemoryTable) -> None:
        name = msg.name
        regions = table.regions
        # Validate everything before changing anything.
        for n, r in enumerate(regions):
            f = f"regions[{n}]"
            if r.memory_size == 0:
                raise ProtocolViolation(name, f"{f}.memory_size", 0, "a region cannot be empty")
            for fld, start in (("guest_phys_addr", r.guest_phys_addr), ("userspace_addr", r.userspace_addr),
                               ("mmap_offset", r.mmap_offset)):
                if start + r.memory_size - 1 > _U64_MAX:
                    raise ProtocolViolation(name, f"{f}.{fld}", start,
                                            f"+ memory_size {r.memory_size:#x} overflows 64 bits")
            try:
                st = os.fstat(msg.fds[n])
            except OSError as e:
                raise ProtocolViolation(name, f"{f}.fd", msg.fds[n], f"fstat failed: {e.strerror}") from None
            if r.mmap_offset + r.memory_size > st.st_size:
                raise ProtocolViolation(name, f"{f}.mmap_offset", r.mmap_offset,
                                        f"+ memory_size {r.memory_size:#x} runs past the end of the "
                                        f"fd ({st.st_size:#x} bytes)")
        for a in range(len(regions)):
            for b in range(a + 1, len(regions)):
                ra, rb = regions[a], regions[b]
                for fld, sa, sb in (("guest_phys_addr", ra.guest_phys_addr, rb.guest_phys_addr),
                                    ("userspace_addr", ra.userspace_addr, rb.userspace_addr)):
                    if sa < sb + rb.memory_size and sb < sa + ra.memory_size:
                        raise ProtocolViolation(name, f"regions[{b}].{fld}", sb,
                                                f"overlaps regions[{a}] ({sa:#x}+{ra.memory_size:#x})")
        # Map the new table.
        new_maps: list[_Mapping] = []
        mem = GuestMemory()
        try:
            for n, r in enumerate(regions):
                try:
                    m = _Mapping(msg.fds[n], r.mmap_offset, r.memory_size)
                except (OSError, ValueError) as e:
                    raise ProtocolViolation(name, f"regions[{n}].fd", msg.fds[n], f"mmap failed: {e}") from None
                new_maps.append(m)
                # A memfd sealed against shrinking (F_SEAL_SHRINK) cannot
                # fault; any other region can be truncated under us: the
                # data path's accesses are SIGBUS-guarded (csrc/vqd_guard.c).
                try:
                    sealed = fcntl.fcntl(msg.fds[n], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
                except OSError:  # not a memfd: no seals
                    sealed = 0
                self.logger.debug("connection %d: region %d (%#x+%#x) %s", self.id, n,
                                 r.guest_phys_addr, r.memory_size,
                                 "is sealed against shrinking (F_SEAL_SHRINK): it cannot fault" if sealed
                                 else "is not sealed against shrinking: data-path accesses are "
                                      "SIGBUS-guarded")
                mem.add(r.guest_phys_addr, m.map, uva=r.userspace_addr, size=r.memory_size,
                        buf_offset=m.buf_offset)
            running = [i for i, v in enumerate(self.vrings) if v.started]
            for i in running:  # rings that keep running must still be mapped
                self._check_ring_mapped(name, self.vrings[i], mem)
        except BaseException:
            for m in new_maps:
                m.close()
            raise
        msg.close_fds()  # the mappings hold the memory; the fds are not needed
        # Stop the rings that use the old table before unmapping it.
        for i in running:
            self._stop(i)
        pending = self._maps + self._stale_maps
        self._maps, self.mem = new_maps, mem
        self._stale_maps = [m for m in pending if not m.close()]
        for i in range(self.num_queues):
            self._maybe_start(name, i)

    def _set_log_base(self, msg: Message, log: LogPayload) -> bytes | None:
        """Dirty logging is never offered (no VHOST_F_LOG_ALL): nothing is
        ever written to the log area, so it is mapped read-only, as the spec
        asks it to be mapped, and otherwise ignored."""
        name = msg.name
        fd = msg.take_fd()
        try:
            if log.mmap_size == 0:
                raise ProtocolViolation(name, "mmap_size", 0, "the log area cannot be empty")
            if log.mmap_offset + log.mmap_size - 1 > _U64_MAX:
                raise ProtocolViolation(name, "mmap_offset", log.mmap_offset,
                                        f"+ mmap_size {log.mmap_size:#x} overflows 64 bits")
            try:
                size = os.fstat(fd).st_size
            except OSError as e:
                raise ProtocolViolation(name, "fd", fd, f"fstat failed: {e.strerror}") from None
            if log.mmap_offset + log.mmap_size > size:
                raise ProtocolViolation(name, "mmap_size", log.mmap_size,
                                        f"with mmap_offset {log.mmap_offset:#x} does not fit the fd "
                                        f"({size:#x} bytes)")
            try:
                m = _Mapping(fd, log.mmap_offset, log.mmap_size, writable=False).map
            except (OSError, ValueError) as e:
                raise ProtocolViolation(msg.name, "fd", fd, f"mmap failed: {e}") from None
        finally:
            os.close(fd)
        if self.log_map is not None:
            try:
                self.log_map.close()
            except BufferError:
                pass
        self.log_map = m
        if self.protocol_features & ProtocolFeature.LOG_SHMFD:
            return pack_u64(0)
        return None

    def _set_log_fd(self, msg: Message, _: None) -> None:
        _close(self.log_call_fd)
        self.log_call_fd = msg.take_fd()

    def _set_vring_num(self, msg: Message, st: VringState) -> None:
        # VIRTIO 1.2 §2.7: Queue Size is a power of 2, at most 32768.
        if st.num == 0 or not is_power_of_two(st.num) or st.num > VIRTQ_MAX_SIZE:
            raise ProtocolViolation(msg.name, "num", st.num,
                                    f"a split ring's size is a power of two, 1 to {VIRTQ_MAX_SIZE} "
                                    f"(VIRTIO 1.2 §2.7)")
        self._reconfigure(msg.name, st.index, lambda v: setattr(v, "num", st.num))

    def _set_vring_addr(self, msg: Message, a: VringAddr) -> None:
        # VIRTIO 1.2 §2.7: alignment 16 (desc), 2 (avail), 4 (used).
        for fld, addr, align in (("desc_user_addr", a.desc_user_addr, 16),
                                 ("avail_user_addr", a.avail_user_addr, 2),
                                 ("used_user_addr", a.used_user_addr, 4)):
            if addr % align:
                raise ProtocolViolation(msg.name, fld, addr,
                                        f"must be {align}-byte aligned (VIRTIO 1.2 §2.7)")
            if self.mem is not None:
                try:
                    self.mem.uva_to_gpa(addr, 1)
                except MemoryAccessError as e:
                    raise ProtocolViolation(msg.name, fld, addr, str(e)) from None

        def apply(v: VringConfig) -> None:
            v.desc_uva, v.avail_uva, v.used_uva = a.desc_user_addr, a.avail_user_addr, a.used_user_addr
            v.log_guest_addr = a.log_guest_addr
            v.addr_flags = a.flags
            v.addr_set = True

        self._reconfigure(msg.name, a.index, apply)

    def _set_vring_base(self, msg: Message, st: VringState) -> None:
        if st.num >= 1 << 16:
            raise ProtocolViolation(msg.name, "num", st.num,
                                    "a split ring's last_avail_idx is 16 bits (packed rings are not offered)")
        self._reconfigure(msg.name, st.index, lambda v: setattr(v, "base", st.num))

    def _get_vring_base(self, msg: Message, st: VringState) -> bytes:
        v = self.vrings[st.index]
        if v.num == 0 and not v.addr_set and not v.started:
            # QEMU and DPDK ask only for rings they set up (vhost_virtqueue_stop
            # skips the others); a base invented for a ring never set up would
            # be handed to the driver as the device's progress.
            raise ProtocolViolation(msg.name, "index", st.index,
                                    "vring was never configured (no SET_VRING_NUM or SET_VRING_ADDR "
                                    "since the connection or the last reset)")
        base = self._stop(st.index)
        self._drop_vring_fds(st.index, kick=True, call=True)
        return VringState(st.index, base).pack()

    def _set_vring_fd(self, msg: Message, value: int, attr: str) -> None:
        index = value & VRING_IDX_MASK
        nofd = bool(value & VRING_NOFD_MASK)
        fd = None if nofd else msg.take_fd()

        def apply(v: VringConfig) -> None:
            _close(getattr(v, attr))
            setattr(v, attr, fd)
            if attr == "kick_fd":
                self._polling[index] = nofd

        try:
            self._reconfigure(msg.name, index, apply)
        except BaseException:
            if getattr(self.vrings[index], attr) != fd:
                _close(fd)
            raise

    def _set_vring_kick(self, msg: Message, value: int) -> None:
        self._set_vring_fd(msg, value, "kick_fd")

    def _set_vring_call(self, msg: Message, value: int) -> None:
        self._set_vring_fd(msg, value, "call_fd")

    def _set_vring_err(self, msg: Message, value: int) -> None:
        self._set_vring_fd(msg, value, "err_fd")

    def _get_queue_num(self, msg: Message, _: None) -> bytes:
        # What the front-end compares its queue count with. For virtio-net,
        # QEMU and DPDK count queue *pairs*. A device says what to answer with
        # a ``vhost_queue_num`` attribute; else a ``queue_pairs`` attribute
        # (virtio-net); else its vring count (vhost-user-blk's convention).
        n = getattr(self.device, "vhost_queue_num", None)
        if n is None:
            n = getattr(self.device, "queue_pairs", None)
        return pack_u64(int(n if n is not None else self.num_queues))

    def _set_vring_enable(self, msg: Message, st: VringState) -> None:
        if st.num > 1:
            raise ProtocolViolation(msg.name, "num", st.num, "enable is 0 or 1")
        v = self.vrings[st.index]
        if st.num:
            v.enabled = True
            self._maybe_start(msg.name, st.index)
        else:
            self._stop(st.index)
            v.enabled = False

    def _set_backend_req_fd(self, msg: Message, _: None) -> None:
        _close(self.backend_req_fd)
        self.backend_req_fd = msg.take_fd()

    def _get_config(self, msg: Message, cfg: ConfigPayload) -> bytes:
        try:
            data = bytes(self.device.get_config(cfg.offset, cfg.size))
            if len(data) != cfg.size:
                raise InspectorError(f"device returned {len(data)} bytes for {cfg.size}")
        except Exception as e:
            # libvhost-user: a reply of size 0 tells the front-end it failed.
            self.logger.warning("connection %d: GET_CONFIG offset=%d size=%d failed: %s",
                                self.id, cfg.offset, cfg.size, e)
            return b""
        return ConfigPayload(cfg.offset, cfg.size, cfg.flags, data).pack()

    def _set_config(self, msg: Message, cfg: ConfigPayload) -> None:
        try:
            self.device.set_config(cfg.offset, cfg.payload)
        except Exception as e:
            raise _Failed(f"SET_CONFIG: offset={cfg.offset} size={cfg.size}: the device refused: {e}") from None

    def _check_inflight(self, name: str, inf: InflightPayload) -> None:
        """Checks common to GET/SET_INFLIGHT_FD (spec "Inflight I/O tracking")."""
        if not self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            raise ProtocolViolation(name, "protocol_features", self.protocol_features,
                                    "INFLIGHT_SHMFD (bit 12) was not negotiated")
        if inf.num_queues == 0 or inf.num_queues > self.num_queues:
            raise ProtocolViolation(name, "num_queues", inf.num_queues,
                                    f"the device has {self.num_queues} vring(s): give 1 to {self.num_queues}")
        # VIRTIO 1.2 §2.7: Queue Size is a power of 2, at most 32768.
        q = inf.queue_size
        if q == 0 or not is_power_of_two(q) or q > VIRTQ_MAX_SIZE:
            raise ProtocolViolation(name, "queue_size", q,
                                    f"a split ring's size is a power of two, 1 to {VIRTQ_MAX_SIZE} "
                                    f"(VIRTIO 1.2 §2.7)")

    def _get_inflight_fd(self, msg: Message, inf: InflightPayload) -> tuple[bytes, list[int]]:
        """Allocate a zeroed inflight area for ``num_queues`` queues of
        ``queue_size`` (a memfd sealed against resizing, as libvhost-user)
        and answer with its size and fd. The area is used once the front-end
        passes it back with SET_INFLIGHT_FD."""
        self._check_inflight(msg.name, inf)
        size = inf.num_queues * inflight_queue_size(inf.queue_size)
        fd = os.memfd_create("vqscope-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        return InflightPayload(size, 0, inf.num_queues, inf.queue_size).pack(), [fd]

    def _set_inflight_fd(self, msg: Message, inf: InflightPayload) -> None:
        """Map the front-end's inflight area (MAP_SHARED, read-write: the
        data path records in-flight heads there) and hand it to the device
        (``device.set_inflight(area, num_queues, queue_size)``: ``area`` is an
        mmap of exactly ``mmap_size`` bytes, owned by this connection and
        closed after the device's close() or the next SET_INFLIGHT_FD)."""
        name = msg.name
        self._check_inflight(name, inf)
        need = inf.num_queues * inflight_queue_size(inf.queue_size)
        if inf.mmap_size < need:
            raise ProtocolViolation(name, "mmap_size", inf.mmap_size,
                                    f"{inf.num_queues} queue(s) of {inf.queue_size} need {need} bytes "
                                    f"({inflight_queue_size(inf.queue_size)} per queue)")
        if inf.mmap_offset % _PAGE:
            raise ProtocolViolation(name, "mmap_offset", inf.mmap_offset,
                                    f"must be a multiple of the page size ({_PAGE}) to be mapped")
        fd = msg.fds[0]
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolViolation(name, "fd", fd, f"fstat failed: {e.strerror}") from None
        if inf.mmap_offset + inf.mmap_size > st.st_size:
            raise ProtocolViolation(name, "mmap_offset", inf.mmap_offset,
                                    f"+ mmap_size {inf.mmap_size:#x} runs past the end of the fd "
                                    f"({st.st_size:#x} bytes)")
        # The area is read when rings start (vqd_inflight_attach), outside the
        # data path's SIGBUS guard: only an area that cannot shrink is taken.
        # Every area comes from a back-end's GET_INFLIGHT_FD, and ours (like
        # libvhost-user's) is a memfd sealed F_SEAL_SHRINK.
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ProtocolViolation(name, "fd", fd, f"the inflight area is not sealed against shrinking "
                                                    f"(F_SEAL_SHRINK; seals {seals:#x}): a truncation "
                                                    f"would fault the back-end")
        try:
            area = _Mapping(fd, inf.mmap_offset, inf.mmap_size).map
        except (OSError, ValueError) as e:
            raise ProtocolViolation(name, "fd", fd, f"mmap failed: {e}") from None
        msg.close_fds()
        set_inflight = getattr(self.device, "set_inflight", None)
        try:
            if set_inflight is not None:
                set_inflight(area, inf.num_queues, inf.queue_size)
        except BaseException:
            area.close()
            raise
        if self.inflight is not None:
            self._stale_inflight.append(self.inflight)
        self.inflight = area
        still = []
        for m in self._stale_inflight:
            try:
                m.close()
            except BufferError:
                still.append(m)
        self._stale_inflight = still

    def _set_status(self, msg: Message, status: int) -> None:
        """The driver's device status (VIRTIO 1.2 §2.1); 0 is a reset, which
        clears NEEDS_RESET (the rings are set up again before they restart)."""
        self._check_status_negotiated(msg.name)
        if status > 0xFF:
            raise ProtocolViolation(msg.name, "status", status, "the device status is 8 bits (VIRTIO 1.2 §2.1)")
        self.device_status = status & ~VIRTIO_CONFIG_S_NEEDS_RESET
        if status == 0:
            self.needs_reset = None

    def _check_status_negotiated(self, name: str) -> None:
        if not self.protocol_features & ProtocolFeature.STATUS:
            raise ProtocolViolation(name, "protocol_features", self.protocol_features,
                                    "STATUS (bit 16) was not negotiated")

    def _get_status(self, msg: Message, _: None) -> bytes:
        self._check_status_negotiated(msg.name)
        return pack_u64(self.device_status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.needs_reset else 0))

    def _on_needs_reset(self, reason: str) -> None:
        """The device's hook (any thread): a queue broke. GET_STATUS shows
        DEVICE_NEEDS_RESET from now on (VIRTIO 1.2 §2.1.2) and, with BACKEND_REQ
        and CONFIG, the front-end gets a CONFIG_CHANGE_MSG (the spec's
        configuration change notification that goes with it)."""
        first = self.needs_reset is None
        self.needs_reset = reason
        if first and not self.closed:
            try:
                self.send_config_change()
            except OSError:
                pass

    # --- back-end → front-end -------------------------------------------------
    def send_config_change(self) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on
        the SET_BACKEND_REQ_FD channel); False when there is no channel."""
        from .protocol import BackendRequest

        if self.backend_req_fd is None or not self.protocol_features & ProtocolFeature.CONFIG:
            return False
        s = socket.socket(fileno=os.dup(self.backend_req_fd))
        try:
            send_message(s, BackendRequest.CONFIG_CHANGE_MSG, ConfigPayload(0, 0, 0).pack())
        except OSError:
            return False
        finally:
            s.close()
        return True


def _close(fd: int | None) -> None:
    """Close ``fd`` if it is one; always returns None (for ``x = _close(x)``)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    return None
