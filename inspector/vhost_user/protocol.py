"""vhost-user requests: payload types, their codecs, and one table of what
each request carries.

Numbers and layouts are the spec's (QEMU docs/interop/vhost-user.rst) and
match libvhost-user; the numbers themselves live in inspector.spec.vhost
(the names used with them are re-exported here). A message is a 12-byte
header, ``size`` bytes of payload and up to 8 fds (inspector/vhost_user/
transport.py reads and writes them); this module says what the payload of
each request is (:data:`REQUESTS`) and decodes it.

Everything here is pure: no state, no I/O, no policy. Every malformed input
raises :class:`ProtocolViolation` (a ProtocolError) naming the request, the
field and the value, so the back-end can log one line and close the
connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..errors import ProtocolError
# The protocol's vocabulary, re-exported so that users of this module need
# one import; the numbers are defined in inspector.spec.vhost only.
from ..spec.vhost import (  # noqa: F401
    FLAG_NEED_REPLY, FLAG_REPLY, MAX_CONFIG_SIZE, MAX_MEM_REGIONS, VERSION, VERSION_MASK,
    VHOST_F_LOG_ALL, VHOST_IOTLB_MSG_STRUCT, VHOST_USER_F_PROTOCOL_FEATURES, VRING_IDX_MASK,
    VRING_NOFD_MASK, BackendRequest, ProtocolFeature, Request,
)

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
LOG = struct.Struct("<QQ")
CONFIG_HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")  # C struct VhostUserInflight is padded to 24

# The largest request payload a front-end sends: VhostUserConfig (12 + 256),
# the biggest member of libvhost-user's payload union.
MAX_PAYLOAD = CONFIG_HEADER.size + MAX_CONFIG_SIZE


class ProtocolViolation(ProtocolError):
    """A message that breaks the spec: ``request`` (name), ``field`` and
    ``value`` say exactly what, ``why`` the rule it breaks."""

    def __init__(self, request: str, field_: str, value: Any, why: str):
        self.request = request
        self.field = field_
        self.value = value
        self.why = why
        shown = value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFF:
            shown = f"{value} ({value:#x})"
        self.shown = str(shown)     # the value as the message shows it
        super().__init__(f"{request}: {field_}={shown}: {why}")


def request_name(request: int) -> str:
    """The spec's name of a request number, or ``UNKNOWN(n)``."""
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN({request})"


# --- payload types --------------------------------------------------------

class _Fixed:
    """A payload that is one fixed-size struct (``STRUCT``), its fields in
    the struct's order; ``WHAT`` names it in a size violation. Made with
    :func:`_fixed`."""

    STRUCT: ClassVar[struct.Struct]
    WHAT: ClassVar[str]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*vars(self).values())

    @classmethod
    def unpack(cls, name: str, data: bytes):
        """Decode ``data`` (exactly ``STRUCT.size`` bytes) of request ``name``."""
        _need(name, data, cls.STRUCT.size, cls.WHAT)
        return cls(*cls.STRUCT.unpack(data))


def _fixed(layout: struct.Struct, what: str):
    """Class decorator: a :class:`_Fixed` dataclass packed as ``layout``."""
    def wrap(cls):
        cls.STRUCT, cls.WHAT = layout, what
        return dataclass(cls)
    return wrap


@_fixed(VRING_STATE, "vring state")
class VringState(_Fixed):
    """struct vhost_vring_state: SET/GET_VRING_BASE, SET_VRING_NUM, _ENABLE."""

    index: int
    num: int


@_fixed(VRING_ADDR, "vring address")
class VringAddr(_Fixed):
    """struct vhost_vring_addr (SET_VRING_ADDR): front-end virtual addresses
    of the three ring areas, and the log's guest address."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@_fixed(VHOST_IOTLB_MSG_STRUCT, "struct vhost_iotlb_msg")
class IotlbMsg(_Fixed):
    """struct vhost_iotlb_msg (IOTLB_MSG, and BACKEND_IOTLB_MSG the other
    way): ``type`` VHOST_IOTLB_*, ``perm`` VHOST_ACCESS_*; 32 bytes."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass
class MalformedIotlbMsg:
    """An IOTLB_MSG whose payload is not a struct vhost_iotlb_msg: ``size``
    bytes. Not a protocol violation: an IOTLB message changes no connection
    state, so the receiver refuses it (a non-zero REPLY_ACK, one log line:
    inspector/vhost_user/iotlb.py) and the connection goes on."""

    size: int


def unpack_iotlb(name: str, data: bytes) -> IotlbMsg | MalformedIotlbMsg:
    """Decode IOTLB_MSG (32 bytes), or say it is malformed."""
    if len(data) != VHOST_IOTLB_MSG_STRUCT.size:
        return MalformedIotlbMsg(len(data))
    return IotlbMsg(*VHOST_IOTLB_MSG_STRUCT.unpack(data))


@_fixed(MEM_REGION, "memory region")
class MemoryRegionDesc(_Fixed):
    """One VhostUserMemoryRegion of a memory table: ``memory_size`` bytes
    at ``guest_phys_addr`` / ``userspace_addr``, ``mmap_offset`` into its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass
class MemoryTable:
    """SET_MEM_TABLE's VhostUserMemory: the regions, one fd each."""

    regions: list[MemoryRegionDesc]

    def pack(self) -> bytes:
        return MEM_HEADER.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)


@_fixed(LOG, "log")
class LogPayload(_Fixed):
    """SET_LOG_BASE's VhostUserLog (the dirty log's size and offset in its fd)."""

    mmap_size: int
    mmap_offset: int


@dataclass
class ConfigPayload:
    """GET/SET_CONFIG's VhostUserConfig: ``size`` bytes at ``offset`` of the
    device config space, ``payload`` the bytes themselves."""

    offset: int
    size: int
    flags: int
    payload: bytes = b""

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.payload


@_fixed(INFLIGHT, "inflight")
class InflightPayload(_Fixed):
    """GET/SET_INFLIGHT_FD's VhostUserInflight (spec "Inflight I/O tracking")."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def _need(name: str, data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolViolation(name, "size", len(data), f"a {what} payload is {size} bytes")


def unpack_u64(name: str, data: bytes) -> int:
    _need(name, data, U64.size, "u64")
    return U64.unpack(data)[0]


unpack_vring_state = VringState.unpack
unpack_vring_addr = VringAddr.unpack
unpack_log = LogPayload.unpack
unpack_inflight = InflightPayload.unpack


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


def unpack_mem_reg(name: str, data: bytes) -> MemoryRegionDesc:
    """Decode ADD_MEM_REG / REM_MEM_REG's VhostUserMemRegMsg (spec
    "Memory region description"): 8 bytes of padding, then one region."""
    _need(name, data, U64.size + MEM_REGION.size, "single memory region")
    return MemoryRegionDesc(*MEM_REGION.unpack_from(data, U64.size))


#: Payload kinds: name -> decoder ``(request name, bytes) -> payload``.
PAYLOAD_DECODERS: dict[str, Callable[[str, bytes], Any]] = {
    "u64": unpack_u64,
    "state": unpack_vring_state,
    "addr": unpack_vring_addr,
    "memory": unpack_memory_table,
    "log": unpack_log,
    "config": unpack_config,
    "inflight": unpack_inflight,
    "mem_reg": unpack_mem_reg,
    "iotlb": unpack_iotlb,
}


# --- the request table ----------------------------------------------------

@dataclass(frozen=True)
class RequestInfo:
    """What one request carries (spec "Front-end message types").

    ``kind``: its payload type, a key of :data:`PAYLOAD_DECODERS`, or None
    (no payload). ``fds``: how many fds come with it: a number,
    ``"regions"`` (one per memory region) or ``"vring_fd"`` (one, unless bit
    8, VRING_NOFD_MASK, of the u64 is set). ``reply``: the back-end answers
    with a payload of its own: True always, a ProtocolFeature only when that
    feature was negotiated, False never (then only a REPLY_ACK, when asked
    for with NEED_REPLY)."""

    kind: str | None = None
    fds: int | str = 0
    reply: bool | ProtocolFeature = False


_R = Request
#: Every request, known or not to this back-end (requests it does not serve
#: are refused after their size and fds were checked against this).
REQUESTS: dict[Request, RequestInfo] = {
    _R.GET_FEATURES: RequestInfo(reply=True),
    _R.SET_FEATURES: RequestInfo("u64"),
    _R.SET_OWNER: RequestInfo(),
    _R.RESET_OWNER: RequestInfo(),
    _R.SET_MEM_TABLE: RequestInfo("memory", "regions"),
    _R.SET_LOG_BASE: RequestInfo("log", 1, reply=ProtocolFeature.LOG_SHMFD),
    _R.SET_LOG_FD: RequestInfo(fds=1),
    _R.SET_VRING_NUM: RequestInfo("state"),
    _R.SET_VRING_ADDR: RequestInfo("addr"),
    _R.SET_VRING_BASE: RequestInfo("state"),
    _R.GET_VRING_BASE: RequestInfo("state", reply=True),
    _R.SET_VRING_KICK: RequestInfo("u64", "vring_fd"),
    _R.SET_VRING_CALL: RequestInfo("u64", "vring_fd"),
    _R.SET_VRING_ERR: RequestInfo("u64", "vring_fd"),
    _R.GET_PROTOCOL_FEATURES: RequestInfo(reply=True),
    _R.SET_PROTOCOL_FEATURES: RequestInfo("u64"),
    _R.GET_QUEUE_NUM: RequestInfo(reply=True),
    _R.SET_VRING_ENABLE: RequestInfo("state"),
    _R.SEND_RARP: RequestInfo("u64"),
    _R.NET_SET_MTU: RequestInfo("u64"),
    _R.SET_BACKEND_REQ_FD: RequestInfo(fds=1),
    _R.IOTLB_MSG: RequestInfo("iotlb"),
    _R.SET_VRING_ENDIAN: RequestInfo("state"),
    _R.GET_CONFIG: RequestInfo("config", reply=True),
    _R.SET_CONFIG: RequestInfo("config"),
    _R.CREATE_CRYPTO_SESSION: RequestInfo(),
    _R.CLOSE_CRYPTO_SESSION: RequestInfo(),
    _R.POSTCOPY_ADVISE: RequestInfo(),
    _R.POSTCOPY_LISTEN: RequestInfo(),
    _R.POSTCOPY_END: RequestInfo(),
    _R.GET_INFLIGHT_FD: RequestInfo("inflight", reply=True),
    _R.SET_INFLIGHT_FD: RequestInfo("inflight", 1),
    _R.GPU_SET_SOCKET: RequestInfo(),
    _R.RESET_DEVICE: RequestInfo(),
    _R.VRING_KICK: RequestInfo("state"),
    _R.GET_MAX_MEM_SLOTS: RequestInfo(),
    _R.ADD_MEM_REG: RequestInfo(),
    _R.REM_MEM_REG: RequestInfo(),
    _R.SET_STATUS: RequestInfo("u64"),
    _R.GET_STATUS: RequestInfo(reply=True),
    _R.GET_SHARED_OBJECT: RequestInfo(),
    _R.SET_DEVICE_STATE_FD: RequestInfo(),
    _R.CHECK_DEVICE_STATE: RequestInfo(),
}
del _R
assert set(REQUESTS) == set(Request), "every Request has its REQUESTS entry"

#: Requests whose u64 payload names a vring and carries an fd unless bit 8 is set.
VRING_FD_REQUESTS = frozenset(r for r, info in REQUESTS.items() if info.fds == "vring_fd")


def payload_kind(request: Request) -> str | None:
    """The payload kind of ``request`` (REQUESTS), None for no payload."""
    return REQUESTS[request].kind


def has_reply(request: Request, protocol_features: int) -> bool:
    """Whether the back-end answers ``request`` with a reply of its own
    (not a REPLY_ACK) once ``protocol_features`` were negotiated."""
    reply = REQUESTS[request].reply
    return bool(reply & protocol_features) if isinstance(reply, ProtocolFeature) else reply


def decode_payload(request: Request, data: bytes) -> Any:
    """Decode the payload of ``request``, checking its size against the
    request's payload type; ``None`` for requests that carry none."""
    kind = REQUESTS[request].kind
    if kind is None:
        if data:
            raise ProtocolViolation(request.name, "size", len(data), "this request carries no payload")
        return None
    return PAYLOAD_DECODERS[kind](request.name, data)


#: The payload of a back-end's reply, for requests whose reply is not a
#: u64 (GET_FEATURES, GET_QUEUE_NUM, ... and every REPLY_ACK are u64s).
REPLY_KINDS: dict[Request, str] = {
    Request.GET_VRING_BASE: "state",
    Request.GET_CONFIG: "config",
    Request.GET_INFLIGHT_FD: "inflight",
}


def decode_reply(request: Request, data: bytes) -> Any:
    """Decode a back-end's reply to ``request`` (its own payload, or the
    u64 of a REPLY_ACK), checking its size against the type. SET_LOG_BASE's
    own reply (LOG_SHMFD: "the log is set up") has no payload: None (QEMU's
    vhost_user_set_log_base reads just the header; DPDK sends it so)."""
    if request == Request.SET_LOG_BASE and not data:
        return None
    return PAYLOAD_DECODERS[REPLY_KINDS.get(request, "u64")](f"{request.name} reply", data)


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
    rule = REQUESTS[request].fds
    if rule == "regions":
        return len(payload.regions)
    if rule == "vring_fd":
        return 0 if payload & VRING_NOFD_MASK else 1
    return rule


def check_header(msg) -> tuple[Request, Any]:
    """Validate a received request (a transport.Message: ``request``,
    ``flags``, ``payload``, ``fds``): version, REPLY bit, known number,
    payload size against its type, and fd count; return the Request and the
    decoded payload."""
    name = request_name(msg.request)
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
    vring_fd = req in VRING_FD_REQUESTS
    if vring_fd:
        extra = payload & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
        if extra:
            raise ProtocolViolation(name, "u64", payload,
                                    "only bits 0-7 (index) and 8 (no fd) may be set")
    want = expected_fds(req, payload)
    if len(msg.fds) != want:
        why = "this request carries no fd" if want == 0 else f"this request carries {want} fd(s)"
        if vring_fd and want == 0:
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
    if req in VRING_FD_REQUESTS:
        return payload & VRING_IDX_MASK
    return None
