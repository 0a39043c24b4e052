"""A corpus of malformed vhost-user messages, one or more per class of hostile
message (the CVE classes of other back-ends), for
tests/integration/test_hostile_messages.py.

Each case is sent on a fresh connection right after a complete, valid
handshake of the built-in front-end (inspector/vhost_user/frontend.py: memory
table mapped, every vring started), so the back-end has state to lose. Each
names the request, field and value of the one log line the back-end must
write. ``ack``: the message is a known request read whole and sent with
NEED_REPLY, so REPLY_ACK must answer it with a non-zero status before the
connection closes; framing errors (payload too large, too many fds, unknown
request numbers) get no reply. ``inflight``: the case needs INFLIGHT_SHMFD
negotiated first (offered only by devices with ``supports_inflight``).
``layout``: the ring layout the session must have negotiated ("split":
VIRTIO_F_RING_PACKED not acked; "packed": acked, VIRTIO 1.2 §2.8), None for
either (the front-end's default: packed when the back-end offers it).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Callable

from inspector.layout import inflight_queue_size
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.protocol import (
    InflightPayload, LogPayload, MemoryRegionDesc, MemoryTable, Request, VringAddr, VringState,
)

MARK = "vqscope-hostile"
MiB = 1 << 20


@dataclass
class Ctx:
    """What a case may depend on: the device's vring count, the session's
    memory (front-end virtual address ``uva`` of ``mem_size`` bytes) and
    its vrings' size."""

    num_queues: int
    uva: int
    mem_size: int
    queue_size: int = 64


def _pbase(avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    """A packed vring base, built bit by bit here (not with the code under
    test), so a position >= size can be written."""
    return avail | avail_wrap << 15 | used << 16 | used_wrap << 31


@dataclass
class Hostile:
    request: int
    payload: bytes = b""
    nfds: int = 0
    flags: int = p.VERSION
    size: int | None = None
    fd_size: int = MiB
    cut: int | None = None        # send only this many bytes, then close (mid-message)


@dataclass
class Case:
    name: str
    klass: str
    build: Callable[[Ctx], Hostile]
    expect: Callable[[Ctx], tuple[str, str, object]]   # request name, field, value
    ack: bool = True
    inflight: bool = False
    layout: str | None = None
    fds: list[int] = field(default_factory=list)


def memfd(size: int) -> int:
    fd = os.memfd_create(MARK)
    os.ftruncate(fd, size)
    return fd


def shown(value) -> str:
    """How ProtocolViolation prints a value."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFF:
        return f"{value} ({value:#x})"
    return str(value)


U64 = p.pack_u64
NR = p.VERSION | p.FLAG_NEED_REPLY


def _mem(*regions: MemoryRegionDesc) -> bytes:
    return MemoryTable(list(regions)).pack()


def _c(name, klass, build, expect, **kw) -> Case:
    return Case(name, klass, build, expect if callable(expect) else (lambda c, e=expect: e), **kw)


CORPUS: list[Case] = [
    # header
    _c("size_over_limit", "header size larger than the payload limit",
       lambda c: Hostile(Request.GET_FEATURES, size=p.MAX_PAYLOAD + 1, flags=NR),
       ("GET_FEATURES", "size", p.MAX_PAYLOAD + 1), ack=False),
    _c("size_vs_type", "header size not matching the payload type",
       lambda c: Hostile(Request.SET_VRING_NUM, VringState(0, 64).pack()[:6], flags=NR),
       ("SET_VRING_NUM", "size", 6)),
    _c("payload_on_fdless_noarg", "header size not matching the payload type",
       lambda c: Hostile(Request.SET_OWNER, bytes(8), flags=NR), ("SET_OWNER", "size", 8)),
    # fds
    _c("fds_too_many", "too many fds",
       lambda c: Hostile(Request.SET_VRING_CALL, U64(0), nfds=9, flags=NR), ("SET_VRING_CALL", "fds", 9),
       ack=False),
    _c("fd_on_fdless", "fds on a request that carries none",
       lambda c: Hostile(Request.GET_FEATURES, nfds=2, flags=NR), ("GET_FEATURES", "fds", 2)),
    _c("fd_with_nofd_bit", "fds on a request that carries none",
       lambda c: Hostile(Request.SET_VRING_KICK, U64(0x100), nfds=1, flags=NR), ("SET_VRING_KICK", "fds", 1)),
    _c("fd_missing", "missing fds",
       lambda c: Hostile(Request.SET_VRING_CALL, U64(1), flags=NR), ("SET_VRING_CALL", "fds", 0)),
    _c("mem_fd_missing", "missing fds",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, MiB, c.uva, 0),
                                                     MemoryRegionDesc(16 * MiB, MiB, c.uva + 16 * MiB, 0)),
                         nfds=1, flags=NR), ("SET_MEM_TABLE", "fds", 1)),
    # memory table
    _c("mem_zero_regions", "SET_MEM_TABLE with 0 regions",
       lambda c: Hostile(Request.SET_MEM_TABLE, struct.pack("<II", 0, 0), flags=NR),
       ("SET_MEM_TABLE", "num_regions", 0)),
    _c("mem_too_many_regions", "SET_MEM_TABLE with more regions than supported",
       # 9 regions' header with 8 regions' bytes: within the payload limit, so
       # num_regions itself is what is checked.
       lambda c: Hostile(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(8 * 32), nfds=8, flags=NR),
       ("SET_MEM_TABLE", "num_regions", 9)),
    _c("mem_overlap", "SET_MEM_TABLE with overlapping regions",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, 2 * 4096, c.uva, 0),
                                                     MemoryRegionDesc(4096, 4096, c.uva + MiB, 0)),
                         nfds=2, flags=NR), ("SET_MEM_TABLE", "regions[1].guest_phys_addr", 4096)),
    _c("mem_zero_size", "SET_MEM_TABLE with a zero-size region",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, 0, c.uva, 0)), nfds=1, flags=NR),
       ("SET_MEM_TABLE", "regions[0].memory_size", 0)),
    _c("mem_offset_overflow", "SET_MEM_TABLE mmap_offset + memory_size overflowing",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, MiB, c.uva, 2**64 - 4096)),
                         nfds=1, flags=NR), ("SET_MEM_TABLE", "regions[0].mmap_offset", 2**64 - 4096)),
    _c("mem_beyond_fd", "SET_MEM_TABLE region beyond the fd's size",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, MiB, c.uva, 4096)),
                         nfds=1, fd_size=MiB, flags=NR), ("SET_MEM_TABLE", "regions[0].mmap_offset", 4096)),
    # vring index on every per-vring request, full u32
    *[_c(f"index_{req.name.lower()}", "vring index >= the queue count",
         lambda c, req=req, mk=mk, n=n: Hostile(req, mk(c.num_queues), nfds=n, flags=NR),
         lambda c, req=req: (req.name, "index", c.num_queues))
      for req, mk, n in (
          (Request.SET_VRING_NUM, lambda i: VringState(i, 64).pack(), 0),
          (Request.SET_VRING_ADDR, lambda i: VringAddr(i, 0, 0, 0, 0, 0).pack(), 0),
          (Request.SET_VRING_BASE, lambda i: VringState(i, 0).pack(), 0),
          (Request.GET_VRING_BASE, lambda i: VringState(i, 0).pack(), 0),
          (Request.SET_VRING_KICK, lambda i: U64(i), 1),
          (Request.SET_VRING_CALL, lambda i: U64(i), 1),
          (Request.SET_VRING_ERR, lambda i: U64(i), 1),
          (Request.SET_VRING_ENABLE, lambda i: VringState(i, 1).pack(), 0),
          (Request.VRING_KICK, lambda i: VringState(i, 0).pack(), 0),
      )],
    _c("index_above_0xffff", "vring index above 0xffff (validated before narrowing)",
       lambda c: Hostile(Request.SET_VRING_NUM, VringState(0x10000, 64).pack(), flags=NR),
       ("SET_VRING_NUM", "index", 0x10000)),
    _c("index_u32_max", "vring index above 0xffff (validated before narrowing)",
       lambda c: Hostile(Request.SET_VRING_ENABLE, VringState(0xFFFFFFFF, 1).pack(), flags=NR),
       ("SET_VRING_ENABLE", "index", 0xFFFFFFFF)),
    _c("kick_index_bits", "vring index above 0xffff (validated before narrowing)",
       lambda c: Hostile(Request.SET_VRING_KICK, U64(0x10000), nfds=1, flags=NR),
       ("SET_VRING_KICK", "u64", 0x10000)),
    # vring values
    _c("num_zero", "SET_VRING_NUM 0",
       lambda c: Hostile(Request.SET_VRING_NUM, VringState(0, 0).pack(), flags=NR), ("SET_VRING_NUM", "num", 0)),
    _c("num_not_pow2", "SET_VRING_NUM not a power of two",
       lambda c: Hostile(Request.SET_VRING_NUM, VringState(0, 100).pack(), flags=NR),
       ("SET_VRING_NUM", "num", 100), layout="split"),
    _c("num_too_big", "SET_VRING_NUM > 32768",
       lambda c: Hostile(Request.SET_VRING_NUM, VringState(0, 65536).pack(), flags=NR),
       ("SET_VRING_NUM", "num", 65536)),
    _c("addr_unmapped", "SET_VRING_ADDR outside the mapped regions",
       lambda c: Hostile(Request.SET_VRING_ADDR, VringAddr(0, 0, c.uva + c.mem_size, c.uva + 0x2000,
                                                           c.uva + 0x1000, 0).pack(), flags=NR),
       lambda c: ("SET_VRING_ADDR", "desc_user_addr", c.uva + c.mem_size)),
    _c("addr_misaligned_desc", "SET_VRING_ADDR misaligned (§2.7: desc 16)",
       lambda c: Hostile(Request.SET_VRING_ADDR, VringAddr(0, 0, c.uva + 8, c.uva + 0x2000,
                                                           c.uva + 0x1000, 0).pack(), flags=NR),
       lambda c: ("SET_VRING_ADDR", "desc_user_addr", c.uva + 8)),
    _c("addr_misaligned_used", "SET_VRING_ADDR misaligned (§2.7: used 4)",
       lambda c: Hostile(Request.SET_VRING_ADDR, VringAddr(0, 0, c.uva, c.uva + 0x2002,
                                                           c.uva + 0x1000, 0).pack(), flags=NR),
       lambda c: ("SET_VRING_ADDR", "used_user_addr", c.uva + 0x2002)),
    _c("addr_misaligned_avail", "SET_VRING_ADDR misaligned (§2.7: avail 2)",
       lambda c: Hostile(Request.SET_VRING_ADDR, VringAddr(0, 0, c.uva, c.uva + 0x2000,
                                                           c.uva + 0x1001, 0).pack(), flags=NR),
       lambda c: ("SET_VRING_ADDR", "avail_user_addr", c.uva + 0x1001)),
    _c("base_too_big", "SET_VRING_BASE >= 65536",
       lambda c: Hostile(Request.SET_VRING_BASE, VringState(0, 65536).pack(), flags=NR),
       ("SET_VRING_BASE", "num", 65536), layout="split"),
    # packed rings (§2.8): the base's two positions (vhost-user packed encoding:
    # bits 0-14 last avail index, 15 its wrap counter, 16-30 used index, 31 its
    # wrap counter) lie in the ring; the driver event suppression area is 4-aligned.
    _c("packed_base_avail_beyond_size", "SET_VRING_BASE packed position beyond the queue size",
       lambda c: Hostile(Request.SET_VRING_BASE, VringState(0, _pbase(c.queue_size, 1, 0, 1)).pack(), flags=NR),
       lambda c: ("SET_VRING_BASE", "num", _pbase(c.queue_size, 1, 0, 1)), layout="packed"),
    _c("packed_base_used_beyond_size", "SET_VRING_BASE packed position beyond the queue size",
       lambda c: Hostile(Request.SET_VRING_BASE, VringState(0, _pbase(0, 1, 0x7FFF, 1)).pack(), flags=NR),
       ("SET_VRING_BASE", "num", _pbase(0, 1, 0x7FFF, 1)), layout="packed"),
    _c("packed_addr_misaligned_driver_event", "SET_VRING_ADDR misaligned (§2.8.10.1: driver event 4)",
       lambda c: Hostile(Request.SET_VRING_ADDR, VringAddr(0, 0, c.uva, c.uva + 0x2000,
                                                           c.uva + 0x1002, 0).pack(), flags=NR),
       lambda c: ("SET_VRING_ADDR", "avail_user_addr", c.uva + 0x1002), layout="packed"),
    _c("get_base_unconfigured", "GET_VRING_BASE on a ring never configured",
       lambda c: Hostile(Request.GET_VRING_BASE, VringState(c.num_queues - 1, 0).pack(), flags=NR),
       lambda c: ("GET_VRING_BASE", "index", c.num_queues - 1)),
    # dirty log
    _c("log_size_zero", "SET_LOG_BASE with a bad size",
       lambda c: Hostile(Request.SET_LOG_BASE, LogPayload(0, 0).pack(), nfds=1, flags=NR),
       ("SET_LOG_BASE", "mmap_size", 0)),
    _c("log_beyond_fd", "SET_LOG_BASE with a bad offset",
       lambda c: Hostile(Request.SET_LOG_BASE, LogPayload(4096, MiB).pack(), nfds=1, flags=NR),
       ("SET_LOG_BASE", "mmap_size", 4096)),
    _c("log_offset_overflow", "SET_LOG_BASE mmap_offset + mmap_size overflowing",
       lambda c: Hostile(Request.SET_LOG_BASE, LogPayload(8192, 2**64 - 4096).pack(), nfds=1, flags=NR),
       ("SET_LOG_BASE", "mmap_offset", 2**64 - 4096)),
    # config
    _c("config_beyond_payload", "GET/SET_CONFIG size beyond the payload",
       lambda c: Hostile(Request.GET_CONFIG, struct.pack("<III", 0, 64, 0) + bytes(8), flags=NR),
       ("GET_CONFIG", "config.size", 64)),
    _c("set_config_over_max", "GET/SET_CONFIG size beyond the payload",
       lambda c: Hostile(Request.SET_CONFIG, struct.pack("<III", 0, 4096, 0) + bytes(16), flags=NR),
       ("SET_CONFIG", "config.size", 4096)),
    # request numbers and flags
    _c("request_zero", "request 0",
       lambda c: Hostile(0, flags=NR), ("UNKNOWN(0)", "request", 0), ack=False),
    _c("request_beyond_spec", "request numbers beyond the spec",
       lambda c: Hostile(max(p.Request) + 1, flags=NR),
       (f"UNKNOWN({max(p.Request) + 1})", "request", max(p.Request) + 1), ack=False),
    _c("request_u32_max", "unknown request numbers",
       lambda c: Hostile(0xFFFFFFFF, flags=NR), ("UNKNOWN(4294967295)", "request", 0xFFFFFFFF), ack=False),
    _c("request_unsupported", "unknown request numbers",
       lambda c: Hostile(Request.POSTCOPY_ADVISE, flags=NR), ("POSTCOPY_ADVISE", "request", 28)),
    _c("reply_bit", "reply bit in a request",
       lambda c: Hostile(Request.GET_QUEUE_NUM, flags=NR | p.FLAG_REPLY),
       ("GET_QUEUE_NUM", "flags", NR | p.FLAG_REPLY)),
    _c("version_2", "wrong version in a request",
       lambda c: Hostile(Request.GET_QUEUE_NUM, flags=p.FLAG_NEED_REPLY | 2), ("GET_QUEUE_NUM", "flags.version", 2)),
    _c("version_0", "wrong version in a request",
       lambda c: Hostile(Request.GET_QUEUE_NUM, flags=p.FLAG_NEED_REPLY), ("GET_QUEUE_NUM", "flags.version", 0)),
    # closing mid-message
    _c("closed_in_header", "a peer that closes mid-message",
       lambda c: Hostile(Request.SET_VRING_CALL, U64(0), nfds=1, cut=7), ("header", "length", 12), ack=False),
    _c("closed_in_payload", "a peer that closes mid-message",
       lambda c: Hostile(Request.SET_MEM_TABLE, _mem(MemoryRegionDesc(0, MiB, c.uva, 0)), nfds=1, cut=20),
       ("SET_MEM_TABLE", "size", 40), ack=False),
    # features never offered
    _c("features_not_offered", "SET_FEATURES with bits never offered",
       lambda c: Hostile(Request.SET_FEATURES, U64(1 << 63), flags=NR), ("SET_FEATURES", "features", 1 << 63)),
    _c("log_all_not_offered", "SET_FEATURES with bits never offered",
       lambda c: Hostile(Request.SET_FEATURES, U64(1 << p.VHOST_F_LOG_ALL), flags=NR),
       ("SET_FEATURES", "features", 1 << p.VHOST_F_LOG_ALL)),
    _c("protocol_features_not_offered", "SET_PROTOCOL_FEATURES with bits never offered",
       lambda c: Hostile(Request.SET_PROTOCOL_FEATURES, U64(p.ProtocolFeature.XEN_MMAP), flags=NR),
       ("SET_PROTOCOL_FEATURES", "protocol_features", int(p.ProtocolFeature.XEN_MMAP))),
    # inflight
    _c("inflight_not_negotiated", "GET/SET_INFLIGHT_FD without INFLIGHT_SHMFD",
       lambda c: Hostile(Request.GET_INFLIGHT_FD, InflightPayload(0, 0, 1, 64).pack(), flags=NR),
       ("GET_INFLIGHT_FD", "protocol_features", None)),
    _c("inflight_num_queues_zero", "GET/SET_INFLIGHT_FD with num_queues 0",
       lambda c: Hostile(Request.GET_INFLIGHT_FD, InflightPayload(0, 0, 0, 64).pack(), flags=NR),
       ("GET_INFLIGHT_FD", "num_queues", 0), inflight=True),
    _c("inflight_num_queues_over", "GET/SET_INFLIGHT_FD with num_queues above the queue count",
       lambda c: Hostile(Request.SET_INFLIGHT_FD, InflightPayload(MiB, 0, c.num_queues + 1, 64).pack(),
                         nfds=1, flags=NR),
       lambda c: ("SET_INFLIGHT_FD", "num_queues", c.num_queues + 1), inflight=True),
    _c("inflight_too_small", "SET_INFLIGHT_FD mmap_size < num_queues x per-queue size",
       lambda c: Hostile(Request.SET_INFLIGHT_FD,
                         InflightPayload(inflight_queue_size(256), 0, 2, 256).pack(), nfds=1, flags=NR),
       ("SET_INFLIGHT_FD", "mmap_size", inflight_queue_size(256)), inflight=True),
]

CLASSES = sorted({c.klass for c in CORPUS})


def send_case(sock, case: Case, ctx: Ctx) -> list[int]:
    """Send ``case`` on ``sock``; returns the fds created for it (the caller
    closes them after checking the back-end closed its copies)."""
    h = case.build(ctx)
    fds = [memfd(h.fd_size) for _ in range(h.nfds)]
    try:
        if h.cut is None:
            t.send_message(sock, h.request, h.payload, fds=fds, flags=h.flags, size=h.size)
        else:
            import array
            import socket
            data = t.encode_message(h.request, h.payload, h.flags, h.size)[:h.cut]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            sock.sendmsg([data], anc)
            sock.shutdown(socket.SHUT_WR)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def expected_text(case: Case, ctx: Ctx) -> tuple[str, str]:
    """The request name and ``field=value`` the log line must hold (value
    None: any value)."""
    req, fld, value = case.expect(ctx)
    return req, f"{fld}=" if value is None else f"{fld}={shown(value)}"
