"""vhost-user wire format: requests, flags, payload codecs, message I/O.

Numbers and layouts are the spec's (QEMU docs/interop/vhost-user.rst) and
match libvhost-user. A message is a 12-byte header (request u32, flags u32,
size u32, all little-endian on the hosts we run on: the spec says "native
endian"), ``size`` bytes of payload, and up to 8 file descriptors passed
with SCM_RIGHTS alongside the header.

Everything here is pure: no state, no policy. Every malformed input raises
:class:`ProtocolViolation` (a ProtocolError) naming the request, the field
and the value, so the back-end can log one line and close the connection.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from ..layout import inflight_queue_size  # noqa: F401  (re-exported: payload checks and tests)
# The protocol's numbers live in inspector.spec.vhost; these names are
# re-exported so that users of this module need one import.
from ..spec.vhost import (  # noqa: F401
    FLAG_NEED_REPLY, FLAG_REPLY, INFLIGHT_ALIGNMENT, INFLIGHT_DESC_SIZE, INFLIGHT_HEADER_SIZE,
    INFLIGHT_VERSION, MAX_CONFIG_SIZE, MAX_FDS, MAX_MEM_REGIONS, VERSION, VERSION_MASK,
    VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VRING_IDX_MASK, VRING_NOFD_MASK,
    BackendRequest, ProtocolFeature, Request,
)


HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
LOG = struct.Struct("<QQ")
CONFIG_HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")  # C struct VhostUserInflight is padded to 24
MEM_REG_MSG = struct.Struct("<Q")  # padding u64, then one MEM_REGION

# The largest request payload a front-end sends: VhostUserConfig (12 + 256),
# the biggest member of libvhost-user's payload union.
MAX_PAYLOAD = CONFIG_HEADER.size + MAX_CONFIG_SIZE

# Control-message buffer: room for more fds than any request may carry so that
# a peer sending too many is detected (and every fd it sent is closed) instead
# of having the kernel silently truncate.
_CMSG_FDS = 64


class ProtocolViolation(ProtocolError):
    """A message that breaks the spec: ``request`` (name), ``field`` and
    ``value`` say exactly what."""

    def __init__(self, request: str, field_: str, value: Any, why: str):
        self.request = request
        self.field = field_
        self.value = value
        self.why = why
        shown = value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFF:
            shown = f"{value} ({value:#x})"
        super().__init__(f"{request}: {field_}={shown}: {why}")


def request_name(request: int) -> str:
    """The spec's name of a request number, or ``UNKNOWN(n)``."""
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN({request})"


# --- payload types --------------------------------------------------------

@dataclass
class VringState:
    index: int
    num: int

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc_user_addr, self.used_user_addr,
                               self.avail_user_addr, self.log_guest_addr)


@dataclass
class MemoryRegionDesc:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                               self.mmap_offset)


@dataclass
class MemoryTable:
    regions: list[MemoryRegionDesc]

    def pack(self) -> bytes:
        return MEM_HEADER.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)


@dataclass
class LogPayload:
    mmap_size: int
    mmap_offset: int

    def pack(self) -> bytes:
        return LOG.pack(self.mmap_size, self.mmap_offset)


@dataclass
class ConfigPayload:
    offset: int
    size: int
    flags: int
    payload: bytes = b""

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.payload


@dataclass
class InflightPayload:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def _need(name: str, data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolViolation(name, "size", len(data), f"a {what} payload is {size} bytes")


def unpack_u64(name: str, data: bytes) -> int:
    _need(name, data, U64.size, "u64")
    return U64.unpack(data)[0]


def unpack_vring_state(name: str, data: bytes) -> VringState:
    _need(name, data, VRING_STATE.size, "vring state")
    return VringState(*VRING_STATE.unpack(data))


def unpack_vring_addr(name: str, data: bytes) -> VringAddr:
    _need(name, data, VRING_ADDR.size, "vring address")
    return VringAddr(*VRING_ADDR.unpack(data))


def unpack_memory_table(name: str, data: bytes) -> MemoryTable:
    """Decode SET_MEM_TABLE; checks 1 ≤ num_regions ≤ 8 and that ``size`` is
    exactly 8 + 32·num_regions (what QEMU and DPDK send)."""
    if len(data) < MEM_HEADER.size:
        raise ProtocolViolation(name, "size", len(data), "a memory table payload is at least 8 bytes")
    n, _padding = MEM_HEADER.unpack_from(data)
    if n == 0 or n > MAX_MEM_REGIONS:
        raise ProtocolViolation(name, "num_regions", n, f"must be 1 to {MAX_MEM_REGIONS}")
    want = MEM_HEADER.size + n * MEM_REGION.size
    if len(data) != want:
        raise ProtocolViolation(name, "size", len(data),
                                f"{n} region(s) take {want} bytes (8 + 32 per region)")
    regions = [MemoryRegionDesc(*MEM_REGION.unpack_from(data, MEM_HEADER.size + i * MEM_REGION.size))
               for i in range(n)]
    return MemoryTable(regions)


def unpack_log(name: str, data: bytes) -> LogPayload:
    _need(name, data, LOG.size, "log")
    return LogPayload(*LOG.unpack(data))


def unpack_config(name: str, data: bytes) -> ConfigPayload:
    """Decode GET/SET_CONFIG; ``size`` must be ≤ 256 and match the bytes that
    follow the 12-byte config header."""
    if len(data) < CONFIG_HEADER.size:
        raise ProtocolViolation(name, "size", len(data), "a config payload is at least 12 bytes")
    offset, size, flags = CONFIG_HEADER.unpack_from(data)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolViolation(name, "config.size", size, f"exceeds the maximum {MAX_CONFIG_SIZE}")
    if CONFIG_HEADER.size + size != len(data):
        raise ProtocolViolation(name, "config.size", size,
                                f"does not match the {len(data) - CONFIG_HEADER.size} payload bytes "
                                f"after the config header")
    return ConfigPayload(offset, size, flags, bytes(data[CONFIG_HEADER.size:]))


def unpack_inflight(name: str, data: bytes) -> InflightPayload:
    _need(name, data, INFLIGHT.size, "inflight")
    return InflightPayload(*INFLIGHT.unpack(data))


# What each request carries: payload kind and how many fds. ``"vring_fd"``
# means one fd unless bit 8 (VRING_NOFD_MASK) of the u64 is set; ``"regions"``
# one fd per memory region. Requests not listed have no payload and no fd.
PAYLOAD_KIND: dict[Request, str] = {
    Request.SET_FEATURES: "u64",
    Request.SET_MEM_TABLE: "memory",
    Request.SET_LOG_BASE: "log",
    Request.SET_VRING_NUM: "state",
    Request.SET_VRING_ADDR: "addr",
    Request.SET_VRING_BASE: "state",
    Request.GET_VRING_BASE: "state",
    Request.SET_VRING_KICK: "u64",
    Request.SET_VRING_CALL: "u64",
    Request.SET_VRING_ERR: "u64",
    Request.SET_PROTOCOL_FEATURES: "u64",
    Request.SET_VRING_ENABLE: "state",
    Request.SEND_RARP: "u64",
    Request.NET_SET_MTU: "u64",
    Request.SET_VRING_ENDIAN: "state",
    Request.GET_CONFIG: "config",
    Request.SET_CONFIG: "config",
    Request.GET_INFLIGHT_FD: "inflight",
    Request.SET_INFLIGHT_FD: "inflight",
    Request.VRING_KICK: "state",
    Request.SET_STATUS: "u64",
}

FDS: dict[Request, Any] = {
    Request.SET_MEM_TABLE: "regions",
    Request.SET_LOG_BASE: 1,
    Request.SET_LOG_FD: 1,
    Request.SET_VRING_KICK: "vring_fd",
    Request.SET_VRING_CALL: "vring_fd",
    Request.SET_VRING_ERR: "vring_fd",
    Request.SET_BACKEND_REQ_FD: 1,
    Request.SET_INFLIGHT_FD: 1,
}

_UNPACK = {
    "u64": unpack_u64,
    "state": unpack_vring_state,
    "addr": unpack_vring_addr,
    "memory": unpack_memory_table,
    "log": unpack_log,
    "config": unpack_config,
    "inflight": unpack_inflight,
}


def decode_payload(request: Request, data: bytes) -> Any:
    """Decode the payload of ``request``, checking its size against the
    request's payload type; ``None`` for requests that carry none."""
    kind = PAYLOAD_KIND.get(request)
    if kind is None:
        if data:
            raise ProtocolViolation(request.name, "size", len(data), "this request carries no payload")
        return None
    return _UNPACK[kind](request.name, data)


def payload_fields(payload: Any) -> dict:
    """The decoded payload as plain ints (for the message log)."""
    if payload is None:
        return {}
    if isinstance(payload, int):
        return {"u64": payload}
    if isinstance(payload, MemoryTable):
        return {"num_regions": len(payload.regions),
                "regions": [dict(vars(r)) for r in payload.regions]}
    if isinstance(payload, ConfigPayload):
        return {"offset": payload.offset, "size": payload.size, "flags": payload.flags}
    return dict(vars(payload))


def expected_fds(request: Request, payload: Any) -> int:
    """How many fds ``request`` with ``payload`` must carry."""
    rule = FDS.get(request, 0)
    if rule == "regions":
        return len(payload.regions)
    if rule == "vring_fd":
        return 0 if payload & VRING_NOFD_MASK else 1
    return rule


# --- messages -------------------------------------------------------------

@dataclass
class Message:
    """One received message. ``fds`` are owned by whoever holds the message:
    take the ones you keep out of the list, :meth:`close_fds` the rest."""

    request: int
    flags: int
    size: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def take_fd(self) -> int:
        return self.fds.pop(0)

    def close_fds(self) -> None:
        while self.fds:
            fd = self.fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass


def encode_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def decode_header(data: bytes) -> tuple[int, int, int]:
    if len(data) != HEADER_SIZE:
        raise ProtocolViolation("header", "length", len(data), f"a header is {HEADER_SIZE} bytes")
    return HEADER.unpack(data)


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION,
                   size: int | None = None) -> bytes:
    return encode_header(request, flags, len(payload) if size is None else size) + payload


def send_message(sock: socket.socket, request: int, payload: bytes = b"", fds=(),
                 flags: int = VERSION, size: int | None = None) -> None:
    """Send one message; ``fds`` go with the header as SCM_RIGHTS."""
    data = encode_message(request, payload, flags, size)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _collect_fds(ancdata, fds: list[int]) -> bool:
    """Append SCM_RIGHTS fds from ``ancdata`` to ``fds``; True when the
    control data was cut short."""
    cut = False
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            if usable != len(cdata):
                cut = True
            fds.extend(array.array("i", cdata[:usable]))
    return cut


class MessageReader:
    """Assemble one message at a time from a stream socket, across as many
    reads as the peer needs, without ever blocking: :meth:`feed` reads what
    is there (MSG_DONTWAIT) and returns the message once it is complete.

    An event loop keeps one reader per connection, so a front-end that stalls
    in the middle of a message holds nobody but itself (libvhost-user and
    DPDK read a whole message with blocking reads; QEMU's vfio-user proxy
    resumes partial reads the same way as here). ``started``: the
    time.monotonic() of the current message's first byte (None between
    messages), for a stall deadline. ``eof``: the peer closed cleanly between
    messages. The reader owns the fds received so far; :meth:`close` closes
    them.

    Raises ProtocolViolation (after closing every fd received) for a payload
    larger than any request carries, more than 8 fds (or control data cut
    short), fds without a message, or a peer that closes mid-message. Other
    OSErrors propagate (the caller closes the reader).
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._payload = bytearray()
        self._size = 0
        self._fds: list[int] = []
        self._truncated = False
        self.started: float | None = None
        self.eof = False

    @property
    def partial(self) -> bool:
        """A message has begun and is not complete."""
        return self.started is not None

    def progress(self) -> str:
        """Where the current message stands (for a stall message)."""
        if len(self._head) < HEADER_SIZE:
            return f"got {len(self._head)} of {HEADER_SIZE} header bytes"
        return f"got {len(self._payload)} of {self._size} payload bytes"

    def _name(self) -> str:
        return request_name(HEADER.unpack(self._head)[0]) if len(self._head) == HEADER_SIZE else "header"

    def stall_violation(self) -> ProtocolViolation:
        """The violation of a peer that stopped sending mid-message."""
        if len(self._head) < HEADER_SIZE:
            return ProtocolViolation("header", "length", HEADER_SIZE,
                                     f"peer stalled in the middle of a message ({self.progress()})")
        return ProtocolViolation(self._name(), "size", self._size,
                                 f"peer stalled in the middle of a message ({self.progress()})")

    def close(self) -> None:
        """Close every fd received for the message being assembled."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def feed(self, sock: socket.socket, flags: int = socket.MSG_DONTWAIT) -> Message | None:
        """Read what ``sock`` has of the current message; the Message once
        complete (its fds then belong to the caller), else None (check
        :attr:`eof`). With ``flags=0`` on a socket with a timeout, a stall
        raises TimeoutError (socket.timeout)."""
        try:
            return self._feed(sock, flags)
        except ProtocolViolation:
            self.close()
            raise

    def _feed(self, sock: socket.socket, flags: int) -> Message | None:
        while True:
            in_head = len(self._head) < HEADER_SIZE
            want = HEADER_SIZE - len(self._head) if in_head else self._size - len(self._payload)
            if want == 0:
                return self._complete()
            try:
                data, anc, mflags, _ = sock.recvmsg(want, socket.CMSG_SPACE(_CMSG_FDS * 4), flags)
            except InterruptedError:
                continue
            except BlockingIOError:
                return None
            self._truncated |= _collect_fds(anc, self._fds) or bool(mflags & socket.MSG_CTRUNC)
            # Named once the header is complete (the fds come with its first
            # byte); never more than one control buffer's worth held.
            if not in_head or self._truncated or len(self._fds) > _CMSG_FDS:
                self._check_fds()
            if not data:
                if self.started is None:
                    if self._fds:
                        raise ProtocolViolation("header", "fds", len(self._fds), "fds without a message")
                    self.eof = True
                    return None
                if in_head:
                    raise ProtocolViolation("header", "length", HEADER_SIZE,
                                            f"peer closed the connection in the middle of a message "
                                            f"({self.progress()})")
                raise ProtocolViolation(self._name(), "size", self._size,
                                        f"peer closed the connection in the middle of a message "
                                        f"({self.progress()})")
            if self.started is None:
                self.started = time.monotonic()
            if in_head:
                self._head += data
                if len(self._head) == HEADER_SIZE:
                    request, _flags, size = HEADER.unpack(self._head)
                    if size > MAX_PAYLOAD:
                        raise ProtocolViolation(request_name(request), "size", size,
                                                f"exceeds the largest request payload ({MAX_PAYLOAD} bytes)")
                    self._size = size
                    self._check_fds()
            else:
                self._payload += data

    def _check_fds(self) -> None:
        if self._truncated or len(self._fds) > MAX_FDS:
            shown = f">{len(self._fds)}" if self._truncated else len(self._fds)
            raise ProtocolViolation(self._name(), "fds", shown, f"a message carries at most {MAX_FDS} fds")

    def _complete(self) -> Message:
        request, flags, size = HEADER.unpack(self._head)
        msg = Message(request, flags, size, bytes(self._payload), self._fds)
        self._head = bytearray()
        self._payload = bytearray()
        self._size = 0
        self._fds = []
        self.started = None
        return msg


def recv_message(sock: socket.socket) -> Message | None:
    """Read one whole message (header, payload, fds) with blocking reads (a
    front-end waiting for a reply; tests). Returns None when the peer closed
    cleanly between messages. Raises ProtocolViolation (closing every fd
    received) for what :class:`MessageReader` rejects, and for a peer that
    stalls mid-message past the socket's timeout (or at all, on a
    non-blocking socket). Request semantics (known number, flags, size vs
    type) are checked by the caller (:func:`check_header`)."""
    reader = MessageReader()
    try:
        try:
            msg = reader.feed(sock, 0)
        except TimeoutError:  # socket.timeout
            msg = None
        if msg is None and not reader.eof:
            raise reader.stall_violation()
        return msg
    except BaseException:
        reader.close()
        raise


def check_header(msg: Message) -> tuple[Request, Any]:
    """Validate a request's header (version, REPLY bit, known number),
    payload size against its type, and fd count; return the Request and the
    decoded payload."""
    name = msg.name
    if msg.flags & VERSION_MASK != VERSION:
        raise ProtocolViolation(name, "flags.version", msg.flags & VERSION_MASK,
                                f"only version {VERSION} exists")
    if msg.flags & FLAG_REPLY:
        raise ProtocolViolation(name, "flags", msg.flags, "the REPLY bit (0x4) is set in a request")
    try:
        req = Request(msg.request)
    except ValueError:
        raise ProtocolViolation(name, "request", msg.request, "unknown request number") from None
    payload = decode_payload(req, msg.payload)
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        extra = payload & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
        if extra:
            raise ProtocolViolation(name, "u64", payload,
                                    "only bits 0-7 (index) and 8 (no fd) may be set")
    want = expected_fds(req, payload)
    if len(msg.fds) != want:
        why = "this request carries no fd" if want == 0 else f"this request carries {want} fd(s)"
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR) and want == 0:
            why = "bit 8 (no fd / polling) is set, so no fd may come with it"
        raise ProtocolViolation(name, "fds", len(msg.fds), why)
    return req, payload


def check_index(req: Request, payload: Any, num_queues: int) -> None:
    """A vring request's index must name one of the device's vrings."""
    index = vring_index(req, payload)
    if index is not None and index >= num_queues:
        raise ProtocolViolation(req.name, "index", index,
                                f"the device has {num_queues} vring(s) (0-{num_queues - 1})")


def vring_index(req: Request, payload: Any) -> int | None:
    """The vring a request addresses, or None."""
    if isinstance(payload, (VringState, VringAddr)):
        return payload.index
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return payload & VRING_IDX_MASK
    return None


def is_closed_error(e: OSError) -> bool:
    return e.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN)
