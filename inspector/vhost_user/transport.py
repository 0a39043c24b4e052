"""vhost-user messages on the wire: the header, sending, and reading whole
messages with their fds from a stream socket.

A message is a 12-byte header (request u32, flags u32, size u32, all
little-endian on the hosts we run on: the spec says "native endian"),
``size`` bytes of payload, and up to 8 file descriptors passed with
SCM_RIGHTS alongside the header (QEMU docs/interop/vhost-user.rst, "Message
Specification"). What the payload of a request is and how it is checked is
inspector/vhost_user/protocol.py's; this module only frames messages.

Reading never trusts the peer: a payload larger than any request carries,
more than 8 fds, control data cut short, fds without a message, or a peer
closing or stalling mid-message raise :class:`~.protocol.ProtocolViolation`
after closing every fd received.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from ..spec.vhost import MAX_FDS, VERSION
from .protocol import MAX_PAYLOAD, ProtocolViolation, request_name

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size

# Control-message buffer: room for more fds than any request may carry so that
# a peer sending too many is detected (and every fd it sent is closed) instead
# of having the kernel silently truncate.
_CMSG_FDS = 64


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
    """The 12-byte header: request, flags, payload size (u32 each)."""
    return HEADER.pack(request, flags, size)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; ProtocolViolation otherwise."""
    if len(data) != HEADER_SIZE:
        raise ProtocolViolation("header", "length", len(data), f"a header is {HEADER_SIZE} bytes")
    return HEADER.unpack(data)


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION,
                   size: int | None = None) -> bytes:
    """Header and payload; ``size`` (default: the payload's length) may lie,
    for tests of a peer's checks."""
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
    type) are checked by the caller (:func:`.protocol.check_header`)."""
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
