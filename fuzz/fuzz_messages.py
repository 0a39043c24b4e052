"""Fuzzer of the vhost-user message parser and validator.

Each *session* is a real :class:`~inspector.vhost_user.backend.BackendConnection`
(over a ``NullDevice`` that also accepts an inflight area) on one end of a
Unix socketpair; the fuzzer is the front-end on the other end. It sends a
prefix of a valid handshake (a random length of it, so that later messages
meet the back-end in different states), then random messages, each with
real fds (memfds of several sizes, eventfds, pipes, /dev/null, sockets)
passed with SCM_RIGHTS, and calls ``handle_readable`` after each as the
server would. Messages are

- *valid*: a well-formed request of the handshake with fresh values;
- *structured*: a request number (known, 0, beyond the spec or random), flags
  (version, NEED_REPLY, REPLY, junk), a payload of some request's type with
  boundary values (indices, sizes, addresses inside/outside/straddling the
  memory table, overflowing offsets), a header size that may not match, and
  0..12 fds of any kind (expected count or not);
- *mutated*: a valid message with bytes flipped, cut or appended;
- *random*: random bytes.

Properties checked for every message (a :class:`Finding` when broken):

- ``handle_readable`` returns (True: accepted, False: the connection is over)
  and never raises; no handler fails with anything but a ProtocolViolation /
  InspectorError (the back-end's catch-all logs other exceptions with
  ``exc_info``: each such record is a finding);
- no message takes longer than ``HANG_S`` (SIGALRM);
- on rejection the fds of this message are closed at once (the process's
  fd count is not above what it was before the message was built), and a
  REPLY_ACK reply, if any, is non-zero;
- an accepted message keeps at most the fds it carried;
- after ``close()`` the fd count and the memfd mappings are back to what they
  were before the session.

Two drivers share the generator through a small ``Draw`` interface:
:class:`HypothesisDraw` (``hypothesis`` strategies, shrinking; the pytest
smoke in tests/unit/test_fuzz_smoke.py) and :class:`RandomDraw` (a seeded
``random.Random``: the bulk run, ``python -m fuzz.fuzz_messages --messages N``,
which is what ``make fuzz`` runs; hypothesis is about 10x slower per message).
A finding is written as a JSON list of the session's messages
(:func:`spec_to_json`) that :func:`replay` runs again; the regression tests
keep such literals.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from inspector.errors import InspectorError
from inspector.layout import inflight_queue_size
from inspector.vhost_user import backend as be
from inspector.vhost_user import protocol as p
from inspector.vhost_user import transport as t
from inspector.vhost_user.backend import BackendConnection
from inspector.vhost_user.protocol import Request
from tests.support.nulldevice import NullDevice

HANG_S = 10.0
MEMFD_NAME = "vqscope-fuzz"
MEM_SIZE = 1 << 20
GPA_BASE = 0x0
UVA_BASE = 0x7F00_0000_0000
RING_NUM = 64
QUEUES = 2

# --- draws -----------------------------------------------------------------


class RandomDraw:
    """Choices from a seeded ``random.Random`` (the fast bulk driver)."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return self.r.randbytes(n)

    def chance(self, percent: int) -> bool:
        return self.r.randrange(100) < percent


class HypothesisDraw(RandomDraw):
    """Choices drawn from hypothesis ``data`` (shrinkable)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, n: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=n, max_size=n))

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent


# --- message specs -------------------------------------------------------------

FD_KINDS = ("memfd", "memfd0", "memfd4k", "memfd_big", "eventfd", "pipe", "devnull", "socket")


@dataclass
class MsgSpec:
    """One message as sent: header fields, payload bytes (``size`` may
    differ from ``len(payload)``), the kinds of fds to create and pass, and
    whether the fuzzer closes its sending side after it (a peer that closes
    mid-message)."""

    request: int
    flags: int
    size: int
    payload: bytes
    fds: list[str] = field(default_factory=list)
    hangup: bool = False
    generated: bool = True  # False for the valid handshake prefix

    def wire(self) -> bytes:
        return t.HEADER.pack(self.request & 0xFFFFFFFF, self.flags & 0xFFFFFFFF,
                             self.size & 0xFFFFFFFF) + self.payload


def spec_to_json(specs: list[MsgSpec]) -> str:
    return json.dumps([{"request": s.request, "flags": s.flags, "size": s.size,
                        "payload": s.payload.hex(), "fds": s.fds, "hangup": s.hangup}
                       for s in specs])


def spec_from_json(text: str) -> list[MsgSpec]:
    return [MsgSpec(d["request"], d["flags"], d["size"], bytes.fromhex(d["payload"]), list(d["fds"]),
                    d.get("hangup", False)) for d in json.loads(text)]


def msg(request: int, payload: bytes = b"", fds=(), flags: int = p.VERSION) -> MsgSpec:
    return MsgSpec(int(request), flags, len(payload), payload, list(fds), generated=False)


def handshake(features: int, protocol_features: int) -> list[MsgSpec]:
    """A valid session up to two started vrings (the order QEMU uses)."""
    out = [msg(Request.SET_OWNER), msg(Request.GET_FEATURES), msg(Request.SET_FEATURES, p.pack_u64(features)),
           msg(Request.GET_PROTOCOL_FEATURES),
           msg(Request.SET_PROTOCOL_FEATURES, p.pack_u64(protocol_features)),
           msg(Request.GET_QUEUE_NUM),
           msg(Request.SET_MEM_TABLE, p.MemoryTable([p.MemoryRegionDesc(GPA_BASE, MEM_SIZE, UVA_BASE, 0)]).pack(),
               ["memfd"])]
    for i in range(QUEUES):
        base = UVA_BASE + 0x10000 * (i + 1)
        out += [msg(Request.SET_VRING_NUM, p.VringState(i, RING_NUM).pack()),
                msg(Request.SET_VRING_ADDR, p.VringAddr(i, 0, base, base + 0x2000, base + 0x1000, 0).pack()),
                msg(Request.SET_VRING_BASE, p.VringState(i, 0).pack()),
                msg(Request.SET_VRING_KICK, p.pack_u64(i), ["eventfd"]),
                msg(Request.SET_VRING_CALL, p.pack_u64(i), ["eventfd"]),
                msg(Request.SET_VRING_ENABLE, p.VringState(i, 1).pack())]
    return out


def extras() -> list[MsgSpec]:
    """Valid requests beyond the handshake (the "valid" mode picks from
    these too, so that their handlers run in every state a session reaches)."""
    inflight = QUEUES * inflight_queue_size(RING_NUM)
    return [msg(Request.GET_INFLIGHT_FD, p.InflightPayload(0, 0, QUEUES, RING_NUM).pack()),
            msg(Request.SET_INFLIGHT_FD, p.InflightPayload(inflight, 0, QUEUES, RING_NUM).pack(),
                ["memfd_big"]),
            msg(Request.SET_STATUS, p.pack_u64(0x0F)), msg(Request.SET_STATUS, p.pack_u64(0)),
            msg(Request.GET_STATUS),
            msg(Request.SET_LOG_BASE, p.LogPayload(4096, 0).pack(), ["memfd4k"]),
            msg(Request.SET_LOG_FD, b"", ["eventfd"]),
            msg(Request.SET_BACKEND_REQ_FD, b"", ["socket"]),
            msg(Request.GET_CONFIG, p.ConfigPayload(0, 16, 0, bytes(16)).pack()),
            msg(Request.SET_CONFIG, p.ConfigPayload(4, 4, 0, b"abcd").pack()),
            msg(Request.GET_VRING_BASE, p.VringState(0, 0).pack()),
            msg(Request.SET_VRING_ERR, p.pack_u64(1), ["eventfd"]),
            msg(Request.SET_VRING_KICK, p.pack_u64(1 | p.VRING_NOFD_MASK)),
            msg(Request.SET_VRING_ENABLE, p.VringState(1, 0).pack()),
            msg(Request.RESET_DEVICE), msg(Request.RESET_OWNER)]


U32S = (0, 1, 2, 3, 7, 8, 9, 63, 64, 255, 256, 257, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
        0xFFFFFFFF)
U16S = (0, 1, 2, 3, 4, 64, 128, 0x7FFF, 0x8000, 0xFFFF)


def u64(d: RandomDraw) -> int:
    c = d.int(0, 9)
    if c == 0:
        return d.int(0, (1 << 64) - 1)
    if c <= 3:  # inside / at the edges of the memory table (uva or gpa)
        base = d.choice((UVA_BASE, GPA_BASE, UVA_BASE + MEM_SIZE, GPA_BASE + MEM_SIZE))
        return (base + d.choice((0, 1, 2, 4, 16, 0x1000, 0x10000, MEM_SIZE - 8, -1, -16, -0x1000))) % (1 << 64)
    if c <= 5:
        return d.choice((0, 1, 0x1000, 1 << 32, 1 << 63, (1 << 64) - 1, (1 << 64) - 0x1000, (1 << 64) - 1 - 0xFFF,
                         MEM_SIZE, MEM_SIZE + 1, 1 << 30))
    if c == 6:
        return 1 << d.int(0, 63)
    return d.choice(U32S)


def u32(d: RandomDraw) -> int:
    return d.choice(U32S) if d.chance(80) else d.int(0, 0xFFFFFFFF)


def index(d: RandomDraw) -> int:
    return d.choice((0, 1, 2, 3, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF)) if d.chance(40) else d.int(0, QUEUES - 1)


def payload_of(d: RandomDraw, kind: str) -> tuple[bytes, list[str]]:
    """A payload of ``kind`` (protocol.PAYLOAD_DECODERS keys) with boundary
    values, and the fds such a message would carry."""
    if kind == "u64":
        v = u64(d) if d.chance(50) else index(d) | (p.VRING_NOFD_MASK if d.chance(20) else 0)
        return p.pack_u64(v), ([] if v & p.VRING_NOFD_MASK else ["eventfd"])
    if kind == "state":
        num = d.choice(U16S + (RING_NUM, 32768, 32769, 65535, 65536, 0xFFFFFFFF)) if d.chance(80) else u32(d)
        return p.VringState(index(d), num).pack(), []
    if kind == "addr":
        base = UVA_BASE + d.choice((0, 0x10000, MEM_SIZE - 0x1000, MEM_SIZE - 8, MEM_SIZE, -16))
        return p.VringAddr(index(d), u32(d) if d.chance(10) else 0,
                           *((base + d.choice((0, 1, 2, 8, 0x2000))) % (1 << 64) if d.chance(70) else u64(d)
                             for _ in range(3)), u64(d) if d.chance(20) else 0).pack(), []
    if kind == "memory":
        n = d.choice((0, 1, 1, 2, 3, 8, 9, 0xFFFFFFFF))
        regions = []
        for _ in range(min(n, 9)):
            if d.chance(50):
                regions.append(p.MemoryRegionDesc(GPA_BASE + 0x100000 * len(regions), MEM_SIZE,
                                                  UVA_BASE + 0x100000 * len(regions), 0))
            else:
                regions.append(p.MemoryRegionDesc(u64(d), u64(d), u64(d), d.choice((0, 0x1000, 1, u64(d)))))
        data = p.MEM_HEADER.pack(n, 0) + b"".join(r.pack() for r in regions)
        return data, ["memfd"] * min(n, 9)
    if kind == "log":
        return p.LogPayload(u64(d), d.choice((0, 0x1000, 1, u64(d)))).pack(), ["memfd4k"]
    if kind == "config":
        size = d.choice((0, 1, 4, 32, 256, 257, 0xFFFFFFFF))
        body = bytes(min(size, 300)) if d.chance(80) else d.bytes(d.int(0, 300))
        return p.CONFIG_HEADER.pack(d.choice((0, 1, 8, 31, 32, 0xFFFFFFFF)), size, u32(d)) + body, []
    if kind == "inflight":
        nq, qs = d.choice((0, 1, 2, 3, 0xFFFF)), d.choice((0, 1, 64, 256, 32768, 0xFFFF))
        return p.InflightPayload(u64(d) if d.chance(50) else nq * (16 + 16 * qs) + 64,
                                 d.choice((0, 0x1000, 1, u64(d))), nq, qs).pack(), ["memfd_big"]
    return b"", []


KINDS = ("u64", "state", "addr", "memory", "log", "config", "inflight")


def gen_message(d: RandomDraw, valid: list[MsgSpec]) -> MsgSpec:
    mode = d.int(0, 9)
    if mode <= 1:  # a valid message again (with its fds)
        s = d.choice(valid)
        return MsgSpec(s.request, s.flags | (p.FLAG_NEED_REPLY if d.chance(30) else 0), s.size, s.payload,
                       list(s.fds))
    if mode <= 6:  # structured
        c = d.int(0, 19)
        if c == 0:
            request = 0
        elif c == 1:
            request = d.int(max(Request) + 1, max(Request) + 20)
        elif c == 2:
            request = d.int(0, 0xFFFFFFFF)
        else:
            request = int(d.choice(list(Request)))
        kind = p.payload_kind(Request(request)) if request in Request._value2member_map_ else None
        if kind is None or d.chance(15):
            kind = d.choice(KINDS + ("none",))
        payload, fds = payload_of(d, kind)
        flags = p.VERSION
        f = d.int(0, 9)
        if f <= 3:
            flags |= p.FLAG_NEED_REPLY
        elif f == 4:
            flags = d.choice((0, 2, 3, p.VERSION | p.FLAG_REPLY, 0xFFFFFFFF))
        elif f == 5:
            flags = d.int(0, 0xFFFFFFFF)
        if d.chance(25):
            fds = [d.choice(FD_KINDS) for _ in range(d.choice((0, 1, 2, 8, 9, 12)))]
        elif d.chance(30):
            fds = [d.choice(FD_KINDS) for _ in fds]
        size = len(payload)
        if d.chance(10):
            size = d.choice((0, len(payload) + 1, max(0, len(payload) - 1), 8, 40, p.MAX_PAYLOAD,
                             p.MAX_PAYLOAD + 1, 0xFFFFFFFF))
        return _short(d, MsgSpec(request, flags, size, payload, fds))
    if mode <= 8:  # mutated valid message
        s = d.choice(valid)
        w = bytearray(s.wire())
        for _ in range(d.int(1, 4)):
            m = d.int(0, 2)
            if m == 0 and w:
                i = d.int(0, len(w) - 1)
                w[i] = d.int(0, 255)
            elif m == 1 and w:
                del w[d.int(0, len(w) - 1):]
            else:
                w += d.bytes(d.int(1, 16))
        w = bytes(w).ljust(t.HEADER_SIZE, b"\0")
        request, flags, size = t.HEADER.unpack_from(w)
        fds = list(s.fds) if d.chance(70) else [d.choice(FD_KINDS) for _ in range(d.int(0, 3))]
        return _short(d, MsgSpec(request, flags, size, w[t.HEADER_SIZE:], fds))
    # random bytes
    w = d.bytes(d.int(0, 48)).ljust(t.HEADER_SIZE, b"\0")
    request, flags, size = t.HEADER.unpack_from(w)
    return _short(d, MsgSpec(request, flags, size, w[t.HEADER_SIZE:],
                             [d.choice(FD_KINDS) for _ in range(d.int(0, 2))]))


def _short(d: RandomDraw, s: MsgSpec) -> MsgSpec:
    """A message whose header promises more payload than follows it is sent
    half the time as a peer that closes mid-message; otherwise it is a peer
    that stalls (BackendConnection.stalled, asked as if its timeout had
    passed)."""
    if s.size > len(s.payload) and s.size <= p.MAX_PAYLOAD and d.chance(50):
        s.hangup = True
    return s


def gen_session(d: RandomDraw, max_random: int = 12) -> list[MsgSpec]:
    """A valid handshake prefix of random length, then random messages
    (valid ones mixed in). Offered features are taken from the back-end's
    own constants so the valid SET_FEATURES stays valid as it evolves."""
    feats = int(_DEVICE_FEATURES) | 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
    pfeats = int(be.OFFERED_PROTOCOL_FEATURES) | int(getattr(be, "INFLIGHT_PROTOCOL_FEATURES", 0))
    valid = handshake(feats, pfeats)
    # mostly short prefixes (each session is one more connection to set up)
    out = valid[:d.choice((0, 0, 0, 0, 1, 3, 7, 8, d.int(0, len(valid)), len(valid)))]
    pool = valid + _EXTRAS
    for _ in range(d.int(1, max_random)):
        out.append(gen_message(d, pool))
    if d.chance(2):  # a peer that closes mid-message
        out[-1].hangup = True
    return out


# --- running ---------------------------------------------------------------------

class FuzzDevice(NullDevice):
    """NullDevice that also takes an inflight area (so INFLIGHT_SHMFD is
    offered) without keeping a reference to it."""

    supports_inflight = True

    def set_inflight(self, area, num_queues: int, queue_size: int) -> None:
        self.inflight = (len(area), num_queues, queue_size)


_DEVICE_FEATURES = FuzzDevice(num_queues=QUEUES).features()
_EXTRAS = extras()


class Finding(Exception):
    """A property broke: ``what`` says which, ``specs`` is the session up to
    and including the message that broke it."""

    def __init__(self, what: str, specs: list[MsgSpec]):
        super().__init__(what)
        self.what = what
        self.specs = specs


class _Hang(BaseException):
    pass


class _Catcher(logging.Handler):
    """Collects log records that carry an exception other than an
    InspectorError (the back-end's catch-all for unexpected failures)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None \
                and not isinstance(record.exc_info[1], InspectorError):
            self.bad.append("".join(traceback.format_exception(*record.exc_info)))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if MEMFD_NAME in line)


def make_fd(kind: str) -> list[int]:
    """The fd(s) of ``kind``: the first is sent, every one is closed after."""
    if kind.startswith("memfd"):
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(fd, {"memfd": MEM_SIZE, "memfd0": 0, "memfd4k": 4096, "memfd_big": 4 << 20}[kind])
        return [fd]
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        return [r, w]
    if kind == "devnull":
        return [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)]
    a, b = socket.socketpair()
    return [a.detach(), b.detach()]


class Session:
    """One BackendConnection over a socketpair; :meth:`send` runs one
    message and checks the per-message properties."""

    def __init__(self, logger: logging.Logger, catcher: _Catcher, map_base: int | None = None):
        self.fd_base = fd_count()
        self.map_base = memfd_mappings() if map_base is None else map_base
        self.check_maps = True
        self.front, back = socket.socketpair()
        self.front.setblocking(False)
        self.conn = BackendConnection(back, FuzzDevice(num_queues=QUEUES), logger)
        self.catcher = catcher
        self.sent: list[MsgSpec] = []
        self.over = False
        self.rx = bytearray()
        self.accepted = self.rejected = 0

    def _drain_replies(self) -> list[tuple[int, int, bytes]]:
        """Read what the back-end sent (closing any fds it passed, e.g.
        GET_INFLIGHT_FD's); return the complete replies."""
        while select.select([self.front], [], [], 0)[0]:
            try:
                data, anc, _, _ = self.front.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except (BlockingIOError, ConnectionResetError):
                break
            for level, ctype, cdata in anc:
                if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                    for fd in array.array("i", cdata[:len(cdata) - len(cdata) % 4]):
                        os.close(fd)
            if not data:
                break
            self.rx += data
        out = []
        while len(self.rx) >= t.HEADER_SIZE:
            req, flags, size = t.HEADER.unpack_from(self.rx)
            if len(self.rx) < t.HEADER_SIZE + size:
                break
            out.append((req, flags, bytes(self.rx[t.HEADER_SIZE:t.HEADER_SIZE + size])))
            del self.rx[:t.HEADER_SIZE + size]
        return out

    def send(self, spec: MsgSpec) -> bool:
        """Send ``spec`` and let the back-end handle what it can read; False
        once the connection is over."""
        self.sent.append(spec)
        self._drain_replies()
        made = [make_fd(k) for k in spec.fds]
        try:
            wire = spec.wire()
            anc = []
            if made:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [m[0] for m in made]).tobytes())]
            try:
                n = self.front.sendmsg([wire], anc)
                if n < len(wire):
                    self.front.setblocking(True)
                    self.front.sendall(wire[n:])
                    self.front.setblocking(False)
            except OSError:
                self.over = True  # the back-end closed its end already
        finally:
            for m in made:
                for fd in m:
                    os.close(fd)
        if spec.hangup:
            self.front.shutdown(socket.SHUT_WR)
        ok = self._handle_pending(spec)
        if ok:
            self.accepted += 1
        else:
            self.rejected += 1
        return ok

    def _check_call(self, spec: MsgSpec, ok: bool, before: int) -> int:
        """Properties of one handle_readable / stalled call that returned
        ``ok``, with the fd count ``before`` it; returns the count after."""
        replies = self._drain_replies()
        if self.catcher.bad:
            bad, self.catcher.bad[:] = self.catcher.bad[0], []
            raise Finding(f"a handler failed with an exception that is not an InspectorError:\n{bad}",
                          list(self.sent))
        now = fd_count()
        if not ok:
            # What the rejected message brought (received in this call or
            # held by the reader since an earlier one) is closed at once.
            if now > before:
                raise Finding(f"rejected message left {now - before} more fd(s) open ({before} -> {now})",
                              list(self.sent))
            for _req, _flags, data in replies:
                if data == p.pack_u64(0):
                    raise Finding("a rejected request was answered 0 (REPLY_ACK success)", list(self.sent))
        elif now > before + len(spec.fds):
            # A kept fd (kick, call, log...) or an mmap's own dup of a memfd.
            raise Finding(f"accepted message with {len(spec.fds)} fd(s) raised the fd count "
                          f"{before} -> {now}", list(self.sent))
        return now

    def _handle_pending(self, spec: MsgSpec) -> bool:
        """handle_readable while the back-end's socket has data (as the
        server's poll loop would: a send may hold several messages, or part
        of one), under a hang alarm; each call's properties checked."""
        back = self.conn.sock
        before = fd_count()
        for _ in range(64):  # each call consumes >= 1 byte or ends the connection
            if self.over:
                return False
            signal.setitimer(signal.ITIMER_REAL, HANG_S)
            try:
                if select.select([back], [], [], 0)[0]:
                    ok = self.conn.handle_readable()
                else:
                    # Nothing more to read. A message still incomplete is a
                    # front-end that stalled: ask as the server's timer would
                    # once its stall_timeout has passed.
                    ok = not self.conn.stalled(time.monotonic() + self.conn.stall_timeout + 1)
                    self._check_call(spec, ok, before)
                    self.over = not ok
                    return ok
            except _Hang:
                raise Finding(f"handling took more than {HANG_S} s", list(self.sent)) from None
            except Exception:  # noqa: BLE001 - any exception out of handle_readable is the finding
                raise Finding("handle_readable raised:\n" + traceback.format_exc(), list(self.sent)) from None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            before = self._check_call(spec, ok, before)
            if not ok:
                self.over = True
                return False
        return True

    def close(self) -> None:
        """Close both ends; the fds and memfd mappings must be back to the
        session's baseline."""
        self.conn.close()
        self.front.close()
        if self.catcher.bad:
            bad, self.catcher.bad[:] = self.catcher.bad[0], []
            raise Finding(f"close() logged an unexpected exception:\n{bad}", list(self.sent))
        if fd_count() != self.fd_base:
            raise Finding(f"fd count {self.fd_base} before the session, {fd_count()} after close()",
                          list(self.sent))
        if self.check_maps and memfd_mappings() != self.map_base:
            raise Finding(f"memfd mappings {self.map_base} before the session, {memfd_mappings()} after "
                          f"close()", list(self.sent))


def _alarm(signum, frame):
    raise _Hang()


class Fuzzer:
    """Runs sessions and counts messages, with a SIGALRM hang alarm (main
    thread only; the previous handler and timer are restored after each
    session) and a quiet logger that catches unexpected exceptions."""

    def __init__(self):
        self.logger = logging.getLogger("vqscope.fuzz.backend")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.catcher = _Catcher()
        self.logger.handlers[:] = [self.catcher]
        self.messages = self.generated = self.sessions = self.accepted = self.rejected = 0
        self.map_base: int | None = None

    #: memfd mappings are counted (reading /proc/self/maps) after every
    #: MAPS_EVERY-th session, against the count before the first: a leaked
    #: mapping stays, so it is found, a few sessions late.
    MAPS_EVERY = 32

    def run(self, specs: list[MsgSpec]) -> None:
        """One session of ``specs`` (stops at the first rejection, as the
        server closes the connection then). Raises Finding."""
        # The hang alarm is SIGALRM: borrow it (pytest-timeout may own it)
        # and give it back, with what was left of its timer.
        prev_handler = signal.signal(signal.SIGALRM, _alarm)
        prev_timer, t0 = signal.setitimer(signal.ITIMER_REAL, 0), time.monotonic()
        try:
            self._run(specs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, prev_handler)
            if prev_timer[0] > 0:
                signal.setitimer(signal.ITIMER_REAL, max(prev_timer[0] - (time.monotonic() - t0), 1e-3),
                                 prev_timer[1])

    def _run(self, specs: list[MsgSpec]) -> None:
        if self.map_base is None:
            self.map_base = memfd_mappings()
        s = Session(self.logger, self.catcher, self.map_base)
        s.check_maps = self.sessions % self.MAPS_EVERY == 0
        self.sessions += 1
        try:
            for spec in specs:
                self.messages += 1
                self.generated += spec.generated
                if not s.send(spec):
                    break
        except BaseException:
            # The first finding is the one to report: close without checks.
            s.check_maps = False
            with contextlib.suppress(Exception):  # the finding in flight is the one to report
                s.close()
            raise
        finally:
            self.accepted += s.accepted
            self.rejected += s.rejected
        try:
            s.close()
        except Finding:
            raise
        except Exception:  # noqa: BLE001 - any exception out of close() is the finding
            raise Finding("close() raised:\n" + traceback.format_exc(), list(s.sent)) from None


def replay(specs_or_json) -> None:
    """Run one recorded session; raises Finding if a property breaks."""
    specs = spec_from_json(specs_or_json) if isinstance(specs_or_json, str) else specs_or_json
    Fuzzer().run(specs)


def bulk(messages: int, seed: int, findings_dir: Path | None, max_findings: int = 10,
         report_every: float = 30.0) -> dict:
    """The seeded random driver: sessions until ``messages`` generated
    messages (not counting the valid handshake prefixes) were sent. Returns
    counts (``messages``: all, prefixes included), elapsed seconds and
    findings (what + JSON)."""
    rng = random.Random(seed)
    d = RandomDraw(rng)
    fz = Fuzzer()
    findings = []
    t0 = last = time.monotonic()
    while fz.generated < messages and len(findings) < max_findings:
        specs = gen_session(d)
        try:
            fz.run(specs)
        except Finding as f:
            findings.append({"what": f.what, "session": spec_to_json(f.specs)})
            if findings_dir is not None:
                findings_dir.mkdir(parents=True, exist_ok=True)
                (findings_dir / f"finding-{seed}-{fz.sessions}.json").write_text(
                    json.dumps(findings[-1], indent=1))
            print(f"FINDING after {fz.messages} messages: {f.what.splitlines()[0]}", file=sys.stderr)
        now = time.monotonic()
        if now - last >= report_every:
            last = now
            print(f"  {fz.messages} messages ({fz.generated} generated), {fz.sessions} sessions, "
                  f"{fz.messages / (now - t0):.0f} msg/s", file=sys.stderr)
    elapsed = time.monotonic() - t0
    return {"generated": fz.generated, "messages": fz.messages, "sessions": fz.sessions, "accepted": fz.accepted,
            "rejected": fz.rejected, "seconds": round(elapsed, 1),
            "messages_per_s": round(fz.messages / elapsed) if elapsed else None, "seed": seed,
            "findings": findings}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--findings", type=Path, default=Path("build/fuzz/message-findings"))
    args = ap.parse_args(argv)
    res = bulk(args.messages, args.seed, args.findings)
    print(f"message fuzzer: {res['messages']} messages ({res['generated']} generated after the "
          f"handshake prefixes) in {res['sessions']} sessions "
          f"({res['accepted']} accepted, {res['rejected']} rejected) in {res['seconds']} s "
          f"({res['messages_per_s']} msg/s, seed {res['seed']}), {len(res['findings'])} finding(s)")
    for f in res["findings"]:
        print(f"  finding: {f['what'].splitlines()[0]}")
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
