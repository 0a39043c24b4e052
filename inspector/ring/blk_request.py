"""The virtio-blk request of each in-flight chain of a block device's
requestq, decoded from guest memory (VIRTIO 1.2 §5.2.6).

A virtio-blk request is one chain: the 16-byte header ``struct
virtio_blk_outhdr`` (``le32 type``, ``le32 reserved``, ``le64 sector``)
device-readable at its start, then the data (device-readable for OUT,
device-writable for IN, GET_ID...), then one device-writable status byte,
last. The status is written at completion, so a chain still in flight has
status ``"pending"``.

:func:`decode_requests` gives one :class:`BlkRequest` per chain of a decoded
ring (split :class:`~inspector.ring.snapshot.RingSnapshot` or packed
:class:`~inspector.ring.packed.PackedRingSnapshot`), reading only the first
16 device-readable bytes of each (which may span descriptors) through a
*reader*: :func:`memory_reader` for a :class:`~inspector.memory.GuestMemory`
(our back-end), :func:`process_reader` for another process's guest RAM (a
QEMU), one ``process_vm_readv`` for every chain. :func:`attach_requests` puts
them on the ring, whose chains then carry them (``Chain.request``, the
``request`` member of a chain of the Snapshot JSON).

Guest memory is hostile: the walk over a chain's descriptors is bounded by
the descriptors the ring decoder listed (itself bounded by the queue size),
at most 16 bytes are read per chain, and a header that is short or not
readable, or a chain whose last descriptor is not a device-writable status
byte, decodes as ``malformed`` naming the field and its value: never an
exception. What a back-end does with such a request (its status) is the
device's business, not this decoder's.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, NamedTuple

from ..errors import InspectorError, SourceGone
from ..memory import GuestMemory
from ..memory.process import ProcessMemory, RamRange, ram_hva
from ..spec.virtio import VIRTIO_BLK_REQ_HDR_SIZE, VIRTIO_BLK_S_NAMES, VIRTIO_BLK_T_NAMES, VRING_DESC_F_WRITE

__all__ = ["BlkRequest", "PENDING", "REQUEST_STATUSES", "Reader", "attach_requests", "decode_header",
           "decode_requests", "header_pieces", "memory_reader", "process_reader", "request_from_dict",
           "type_name"]

#: The status of a request still in flight (its status byte is not written yet).
PENDING = "pending"
#: Every status a request may show: pending, then the device's (§5.2.6: OK, IOERR, UNSUPP).
REQUEST_STATUSES = (PENDING,) + tuple(VIRTIO_BLK_S_NAMES.values())

_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, reserved (ioprio), sector
assert _OUTHDR.size == VIRTIO_BLK_REQ_HDR_SIZE

#: ``read(ranges)``: for each guest-physical ``(addr, size)`` its bytes, or a
#: string saying why it could not be read.
Reader = Callable[[list[tuple[int, int]]], list["bytes | str"]]


class BlkRequest(NamedTuple):
    """One chain's virtio-blk request (§5.2.6). ``type``: the name from
    VIRTIO_BLK_T_NAMES (``"in"``, ``"out"``, ``"flush"``...), the number for
    a type the spec does not name, None when the header was not read;
    ``sector``: the header's sector (512-byte units), None likewise;
    ``data_len``: bytes between the 16-byte header and the status byte (None
    when the chain is too short to tell); ``status``: ``"pending"`` (in
    flight) or a VIRTIO_BLK_S_NAMES name; ``malformed``: None, or the field
    that breaks §5.2.6 and its value (``"header: 12 device-readable bytes,
    not 16"``)."""

    type: str | int | None
    sector: int | None
    data_len: int | None
    status: str = PENDING
    malformed: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The Snapshot JSON ``request`` member: ``type``, ``sector``,
        ``data_len``, ``status``, and ``malformed`` only when set."""
        d = {"type": self.type, "sector": self.sector, "data_len": self.data_len, "status": self.status}
        if self.malformed is not None:
            d["malformed"] = self.malformed
        return d


_REQUEST_KEYS = frozenset({"type", "sector", "data_len", "status"})


def request_from_dict(d: Any) -> BlkRequest:
    """The BlkRequest of a JSON ``request`` member; ValueError naming the
    first member that is missing or of the wrong type, its message to be
    appended to where the member is (``" is ..."``, ``".type is ..."``)."""
    if type(d) is not dict:
        raise ValueError(f" is {d!r:.60}, not an object")
    keys = d.keys()
    if not _REQUEST_KEYS <= keys or not keys <= _REQUEST_KEYS | {"malformed"}:
        raise ValueError(f" has members {sorted(keys)}, not type, sector, data_len, status[, malformed]")
    t = d["type"]
    if not (t is None or type(t) is str or type(t) is int):
        raise ValueError(f".type is {t!r:.60}, not a request type name, number or null")
    for m in ("sector", "data_len"):
        if not (d[m] is None or type(d[m]) is int):
            raise ValueError(f".{m} is {d[m]!r:.60}, not an int or null")
    if d["status"] not in REQUEST_STATUSES:
        raise ValueError(f".status is {d['status']!r:.60}, not one of {', '.join(REQUEST_STATUSES)}")
    bad = d.get("malformed")
    if not (bad is None or type(bad) is str):
        raise ValueError(f".malformed is {bad!r:.60}, not a string")
    return BlkRequest(t, d["sector"], d["data_len"], d["status"], bad)


def type_name(t: int) -> str | int:
    """A request type's name (VIRTIO_BLK_T_NAMES), or the number."""
    return VIRTIO_BLK_T_NAMES.get(t, t)


def header_pieces(lens: list[int], flags: list[int], addrs: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Where a chain's header is: the ``(addr, size)`` pieces of its first
    :data:`VIRTIO_BLK_REQ_HDR_SIZE` device-readable bytes, from its first
    descriptor up to the first device-writable one (§5.2.6: the header is
    device-readable and comes first), and how many bytes they hold (less
    than 16: the header is short). Bounded by the descriptors given."""
    pieces = []
    want = VIRTIO_BLK_REQ_HDR_SIZE
    for ln, fl, addr in zip(lens, flags, addrs):
        if fl & VRING_DESC_F_WRITE or not want:
            break
        n = min(ln, want)
        if n:
            pieces.append((addr, n))
            want -= n
    return pieces, VIRTIO_BLK_REQ_HDR_SIZE - want


def decode_header(header: bytes, out_bytes: int, in_bytes: int, last_len: int | None,
                  last_flags: int | None) -> BlkRequest:
    """The pending request of a chain whose 16 header bytes are ``header``,
    whose device-readable and device-writable bytes are ``out_bytes`` and
    ``in_bytes`` and whose last descriptor has ``last_len`` and
    ``last_flags`` (None: no descriptor). A chain without a device-writable
    last byte for the status is ``malformed`` "status" (data_len then
    counts every byte after the header)."""
    t, _reserved, sector = _OUTHDR.unpack(header)
    data = out_bytes - VIRTIO_BLK_REQ_HDR_SIZE + in_bytes
    bad = _status_problem(last_len, last_flags)
    if bad is None:
        data -= 1
    return BlkRequest(type_name(t), sector, data, PENDING, bad)


def _status_problem(last_len: int | None, last_flags: int | None) -> str | None:
    if last_len is None:
        return "status: the chain has no descriptor"
    if not last_flags & VRING_DESC_F_WRITE:
        return (f"status: the last descriptor (len {last_len}, flags {last_flags:#x}) is device-readable, "
                f"not the device-writable status byte")
    if last_len < 1:
        return "status: the last descriptor has len 0, no byte for the status"
    return None


def decode_requests(ring, read: Reader) -> list[BlkRequest]:
    """One pending :class:`BlkRequest` per chain of ``ring`` (a
    RingSnapshot or PackedRingSnapshot: its ``desc_*`` and ``chain_*``
    columns), the headers read through ``read`` in one call. Never raises
    for what guest memory holds: a short or unreadable header is a
    ``malformed`` "header" (type, sector and data_len None). A reader's
    SourceGone (the process exited) is raised."""
    addrs, lens, flags = ring.desc_addr.tolist(), ring.desc_len.tolist(), ring.desc_flags.tolist()
    rows = list(zip(ring.chain_first.tolist(), ring.chain_ndescs.tolist(), ring.chain_out_bytes.tolist(),
                    ring.chain_in_bytes.tolist()))
    wanted: list[tuple[int, int]] = []
    where: list[tuple[int, int, int]] = []   # per chain: first piece, number of pieces, bytes found
    for s, c, _ob, _ib in rows:
        pieces, got = header_pieces(lens[s:s + c], flags[s:s + c], addrs[s:s + c])
        where.append((len(wanted), len(pieces), got))
        if got == VIRTIO_BLK_REQ_HDR_SIZE:
            wanted += pieces
    try:
        data = read(wanted) if wanted else []
    except SourceGone:
        raise
    except InspectorError as e:   # a reader that failed as a whole
        data = [str(e)] * len(wanted)
    out = []
    for (s, c, ob, ib), (p, n, got) in zip(rows, where):
        if got < VIRTIO_BLK_REQ_HDR_SIZE:
            out.append(BlkRequest(None, None, None, PENDING,
                                  f"header: {got} device-readable bytes before the first device-writable "
                                  f"descriptor, not {VIRTIO_BLK_REQ_HDR_SIZE}"))
            continue
        parts = data[p:p + n]
        err = next((x for x in parts if isinstance(x, str)), None)
        if err is not None:
            addr = wanted[p][0]
            out.append(BlkRequest(None, None, None, PENDING, f"header: at guest-physical {addr:#x} not readable "
                                                             f"({err})"))
            continue
        last = s + c - 1
        out.append(decode_header(b"".join(parts), ob, ib, lens[last] if c else None, flags[last] if c else None))
    return out


def memory_reader(mem: GuestMemory) -> Reader:
    """A Reader over ``mem`` (each range must lie in one readable region)."""
    def read(ranges: list[tuple[int, int]]) -> list[bytes | str]:
        out: list[bytes | str] = []
        for addr, n in ranges:
            try:
                out.append(mem.read(addr, n))
            except InspectorError as e:
                out.append(str(e))
        return out
    return read


def process_reader(pmem: ProcessMemory, ram: list[RamRange]) -> Reader:
    """A Reader of guest RAM mapped in another process (``ram``: guest-physical
    → host-virtual), every range in one ``process_vm_readv``
    (:meth:`ProcessMemory.gather_partial`)."""
    def read(ranges: list[tuple[int, int]]) -> list[bytes | str]:
        hvas = [ram_hva(ram, addr, n) for addr, n in ranges]
        todo = [(h, n) for h, (_, n) in zip(hvas, ranges) if h is not None]
        buf, offsets, failed = pmem.gather_partial(todo) if todo else (bytearray(), [], set())
        out: list[bytes | str] = []
        k = 0
        for h, (addr, n) in zip(hvas, ranges):
            if h is None:
                out.append(f"{n} bytes at guest-physical {addr:#x} are not in one guest RAM range")
                continue
            if k in failed:
                out.append(f"{n} bytes at host virtual {h:#x} are not mapped in process {pmem.pid}")
            else:
                out.append(bytes(buf[offsets[k]:offsets[k] + n]))
            k += 1
        return out
    return read


def attach_requests(ring, read: Reader):
    """Decode the requests of ``ring``'s chains (:func:`decode_requests`)
    and keep them on it: its chains then carry them (``Chain.request``,
    ``chain_dicts()``'s ``request``). Returns ``ring``."""
    ring.requests = decode_requests(ring, read)
    return ring
