"""One end of a proxied vhost-user link: frame what a peer sends into whole
messages and pass them on, byte for byte with their fds, to the peer on the
other side (inspector/vhost_user/proxy.py owns the sockets and the loop).

A :class:`LinkSide` is one socket the proxy holds: the front-end's
connection, the back-end's connection, or either end of the back-end
request channel (SET_BACKEND_REQ_FD's socket pair). What it reads goes to
its ``peer``'s outbox; the loop writes the outbox when the peer's socket is
writable. Nothing is ever dropped or rewritten here: the owner's
``on_message`` hook may only swap the fds of a message (the back-end request
channel, interposed eventfds), never its bytes.

Framing (QEMU docs/interop/vhost-user.rst, "Message Specification"): a
12-byte header (request, flags, size: u32 each), ``size`` payload bytes, and
the fds sent with SCM_RIGHTS alongside the header. Each read asks for at
most the rest of the current message, so the fds of the next message (which
the kernel hands out with its first byte) are never taken early. A header
whose size exceeds the largest payload any request carries
(protocol.MAX_PAYLOAD) is passed on at once and its payload streamed through
in bounded chunks (never buffered whole); the owner logs it.

Bounds: a side stops reading while its peer's outbox holds more than
``OUTBOX_LIMIT`` bytes, so a slow peer holds only its own link. Fds received
are owned by the message until it is sent (then closed: the peer got its
own copies) or the link closes (then closed too).
"""

from __future__ import annotations

import array
import collections
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InspectorError
from .protocol import MAX_PAYLOAD
from .transport import HEADER, HEADER_SIZE, _collect_fds

#: Bytes a side's outbox may hold before the side feeding it stops reading.
OUTBOX_LIMIT = 1 << 20
#: Largest chunk of an oversized payload read (and queued) at once.
STREAM_CHUNK = 64 << 10
#: Control buffer: room for more fds than any message may carry, so that a
#: peer sending too many is seen (and logged) rather than silently truncated.
_CMSG_FDS = 64
#: Messages read from one side per readable event before others get a turn.
_MESSAGES_PER_EVENT = 32


def close_fds(fds: list[int]) -> None:
    """Close every fd of ``fds`` (emptying it), ignoring errors."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


@dataclass
class Frame:
    """One whole message read from a side: ``request``, ``flags``, ``size``
    (the header's), ``payload`` (bytes; empty when ``streamed``: then only
    the header was buffered and the payload goes through in chunks), ``fds``
    (owned by the frame until sent), ``truncated`` (the kernel dropped fds:
    the control buffer overflowed)."""

    request: int
    flags: int
    size: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    streamed: bool = False
    truncated: bool = False

    def header(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)


@dataclass
class Counters:
    """Per direction: what came in (``messages``, ``bytes``, ``fds``) and
    what went out (``*_out``); equal once the outbox is empty, which is how
    the proxy shows it sent nothing of its own."""

    messages: int = 0
    bytes: int = 0
    fds: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    fds_out: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


class _Out:
    """One outbox entry: ``data`` from ``offset`` on; ``fds`` go with its
    first byte; ``last``: it ends a message."""

    __slots__ = ("data", "offset", "fds", "last")

    def __init__(self, data: bytes, fds: list[int], last: bool):
        self.data = data
        self.offset = 0
        self.fds = fds
        self.last = last


class LinkClosed(InspectorError):
    """``side``'s socket hung up or failed: ``why`` for the log line."""

    def __init__(self, side: "LinkSide", why: str):
        super().__init__(why)
        self.side = side
        self.why = why


class LinkSide:
    """One socket of a proxied link. ``name``: who is at the other end of
    ``sock`` ("front-end", "back-end", "back-end request channel (front-end
    end)", ...); ``direction``: the message-log name of what is read from it
    ("front-end", "back-end", "backend-req", "backend-req-reply");
    ``counters``: that direction's :class:`Counters`. ``peer`` is where what
    is read goes (set by the owner). ``on_message(side, frame)`` is called
    for each whole frame before it is queued, and ``on_oversize(side,
    frame)`` for a header whose payload is streamed.

    :meth:`read` and :meth:`flush` raise :class:`LinkClosed` when the socket
    hung up or failed; the owner then closes the link.
    """

    def __init__(self, sock: socket.socket, name: str, direction: str,
                 on_message: Callable[["LinkSide", Frame], None],
                 on_oversize: Callable[["LinkSide", Frame], None]):
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.direction = direction
        self.counters = Counters()
        self.peer: LinkSide | None = None
        self.owner = None              # the owner's connection object, for its loop
        self.closed = False
        self._on_message = on_message
        self._on_oversize = on_oversize
        self._head = bytearray()
        self._payload = bytearray()
        self._fds: list[int] = []
        self._truncated = False
        self._stream_left = 0          # payload bytes of an oversized message still to pass on
        self.outbox: collections.deque[_Out] = collections.deque()
        self.out_bytes = 0

    # --- reading -------------------------------------------------------------------
    @property
    def throttled(self) -> bool:
        """Its peer's outbox is over the limit: do not read until it drains."""
        return self.peer is not None and self.peer.out_bytes > OUTBOX_LIMIT

    @property
    def mid_message(self) -> bool:
        return bool(self._head or self._payload or self._stream_left)

    def read(self) -> None:
        """Read whole messages (at most a few per call) and queue them on
        the peer; returns when the socket has nothing more, or the peer's
        outbox is full."""
        for _ in range(_MESSAGES_PER_EVENT):
            if self.throttled or not self._read_some():
                return

    def _recv(self, want: int) -> bytes | None:
        try:
            data, anc, mflags, _ = self.sock.recvmsg(want, socket.CMSG_SPACE(_CMSG_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise LinkClosed(self, f"{self.name}: read failed: {e.strerror or e}") from None
        cut = _collect_fds(anc, self._fds) or bool(mflags & socket.MSG_CTRUNC)
        self._truncated |= cut
        if not data:
            if self.mid_message:
                # What came of the message is passed on all the same (the
                # peer sees what it would have seen without the proxy: a
                # message cut short, then the hang-up).
                partial, fds = bytes(self._head + self._payload), self._fds
                self._head, self._payload, self._fds = bytearray(), bytearray(), []
                if partial and self.peer is not None:
                    self.peer.queue(partial, fds, last=False)
                else:
                    close_fds(fds)
                raise LinkClosed(self, f"{self.name} hung up in the middle of a message")
            if self._fds:
                raise LinkClosed(self, f"{self.name} sent {len(self._fds)} fd(s) without a message and hung up")
            raise LinkClosed(self, f"{self.name} hung up")
        self.counters.bytes += len(data)
        return data

    def _read_some(self) -> bool:
        """One step of the current message; False when the socket is empty."""
        if self._stream_left:
            data = self._recv(min(self._stream_left, STREAM_CHUNK))
            if data is None:
                return False
            self._stream_left -= len(data)
            fds, self._fds = self._fds, []     # fds mid-payload: passed on where they came
            self.peer.queue(data, fds, last=not self._stream_left)
            return True
        if len(self._head) < HEADER_SIZE:
            data = self._recv(HEADER_SIZE - len(self._head))
            if data is None:
                return False
            self._head += data
            if len(self._head) < HEADER_SIZE:
                return True
            request, flags, size = HEADER.unpack(self._head)
            if size > MAX_PAYLOAD:
                frame = self._take(request, flags, size, b"", streamed=True)
                self._on_oversize(self, frame)
                self._stream_left = size
                self.peer.queue(frame.header(), frame.fds, last=False)
                return True
            if size:
                return True
            self._deliver(self._take(request, flags, size, b""))
            return True
        request, flags, size = HEADER.unpack(self._head)
        data = self._recv(size - len(self._payload))
        if data is None:
            return False
        self._payload += data
        if len(self._payload) == size:
            self._deliver(self._take(request, flags, size, bytes(self._payload)))
        return True

    def _take(self, request: int, flags: int, size: int, payload: bytes, streamed: bool = False) -> Frame:
        frame = Frame(request, flags, size, payload, self._fds, streamed, self._truncated)
        self._fds, self._truncated = [], False
        self._head = bytearray()
        self._payload = bytearray()
        self.counters.messages += 1
        self.counters.fds += len(frame.fds)
        return frame

    def _deliver(self, frame: Frame) -> None:
        try:
            self._on_message(self, frame)
        finally:
            self.peer.queue(frame.header() + frame.payload, frame.fds, last=True)

    # --- writing -------------------------------------------------------------------
    def queue(self, data: bytes, fds: list[int], last: bool) -> None:
        """Queue ``data`` (with ``fds`` on its first byte) to be sent on
        this side's socket; the fds are closed once sent (or when the side
        closes). Counted against the direction that feeds this side."""
        if self.closed:
            close_fds(fds)
            return
        self.outbox.append(_Out(data, fds, last))
        self.out_bytes += len(data)

    def flush(self) -> None:
        """Send what the socket takes now; LinkClosed when it fails."""
        feed = self.peer.counters if self.peer is not None else None
        while self.outbox:
            out = self.outbox[0]
            view = memoryview(out.data)[out.offset:]
            try:
                if out.fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                            array.array("i", out.fds).tobytes())]
                    n = self.sock.sendmsg([view], anc)
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise LinkClosed(self, f"{self.name}: write failed: {e.strerror or e}") from None
            if out.fds:
                if feed is not None:
                    feed.fds_out += len(out.fds)
                close_fds(out.fds)
            out.offset += n
            self.out_bytes -= n
            if feed is not None:
                feed.bytes_out += n
            if out.offset == len(out.data):
                self.outbox.popleft()
                if out.last and feed is not None:
                    feed.messages_out += 1

    @property
    def wants_write(self) -> bool:
        return bool(self.outbox)

    def close(self) -> None:
        """Close the socket and every fd held (partial message, outbox)."""
        if self.closed:
            return
        self.closed = True
        close_fds(self._fds)
        for out in self.outbox:
            close_fds(out.fds)
        self.outbox.clear()
        self.out_bytes = 0
        try:
            self.sock.close()
        except OSError:
            pass
