"""``vqscope proxy --count-notifications``: the proxy's own eventfds between
the front-end and the back-end, to count and time kicks and calls.

SET_VRING_KICK is forwarded with the proxy's eventfd K' instead of the
front-end's K: the proxy reads K and writes what it read to K'. SET_VRING_CALL
is forwarded with C' instead of C: the proxy reads C' and writes C. The
counter value read is written on unchanged, so the peer sees the same sum
(eventfd(2) semantics), one wake-up later. Every relay is a timed event of
the event model (inspector/events.py: ``kick``, value the kicks coalesced
into the read; ``call``, value 0: the proxy does not read the used index).

The cost is a wake-up of the proxy's loop per notification (epoll, read,
write: Python): measured with the built-in front-end bouncing one frame at a
time off ``serve net --loopback`` (about 1.9 kicks and calls per round
trip), a round trip took 26 µs direct, 28 µs through the proxy without the
flag and 82 µs with it (medians of 3 rounds on the 2-core CI machine; the
rounds swing by 2x): some 25-50 µs per relayed notification. A driver and
device that suppress notifications under load pay next to nothing
(dpdk-testpmd io forwarding through it: 1 kick per vring, no call, in 8
million packets).

Without the flag none of this exists: kick and call fds are forwarded
unchanged and the data path never passes through the proxy. SET_VRING_ERR
and a vring fd request with the NOFD bit (8) set are always passed through
untouched (the latter drops the vring's relay: the front-end polls).
"""

from __future__ import annotations

import os
import select
import time

from ..events import EVENT_KIND_CODES, EVENT_RECORD

_U64 = 8
#: Records a relay keeps between two drains before dropping the oldest
#: (a vring kicked faster than the 50 ms drain period for that long).
MAX_PENDING = 8192


class Notifier:
    """One relayed eventfd of vring ``index``: ``kind`` "kick" (read the
    front-end's K = ``read_fd``, write the proxy's K' = ``write_fd``) or
    "call" (read C', write the front-end's C). Owns both fds. ``count``:
    relays so far; ``records``: packed EVENT_RECORDs not drained yet;
    ``dropped``: records lost to MAX_PENDING."""

    def __init__(self, kind: str, index: int, read_fd: int, write_fd: int):
        self.kind = kind
        self.index = index
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.count = 0
        self.dropped = 0
        self.records = bytearray()
        self._code = EVENT_KIND_CODES[kind]

    def relay(self) -> bool:
        """Read what the eventfd counted, write it on, record the event;
        False when nothing was there (a spurious wake-up, or another reader
        of the front-end's fd took it first)."""
        if not select.select([self.read_fd], [], [], 0)[0]:
            return False
        try:
            data = os.read(self.read_fd, _U64)
        except (BlockingIOError, InterruptedError):
            return False
        if len(data) != _U64:
            return False
        try:
            os.write(self.write_fd, data)
        except BlockingIOError:     # the counter would overflow: the peer has not read for 2^64 kicks
            pass
        self.count += 1
        if len(self.records) >= MAX_PENDING * EVENT_RECORD.size:
            del self.records[:EVENT_RECORD.size]
            self.dropped += 1
        value = int.from_bytes(data, "little") if self.kind == "kick" else 0
        self.records += EVENT_RECORD.pack(time.time_ns(), self._code, value & 0xFFFFFFFF)
        return True

    def drain(self) -> bytes:
        """The records since the last drain (oldest first)."""
        out, self.records = bytes(self.records), bytearray()
        return out

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1


def is_eventfd(fd: int) -> bool:
    """Is ``fd`` an eventfd (what a kick or call fd must be)?"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def interpose(kind: str, index: int, frame_fds: list[int]) -> Notifier:
    """Replace the front-end's eventfd in ``frame_fds`` (one fd, kept by the
    returned Notifier) with a dup of a new eventfd of the proxy's; OSError
    (nothing changed) when an eventfd cannot be made."""
    mine = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        sent = os.dup(mine)
    except OSError:
        os.close(mine)
        raise
    theirs = frame_fds[0]
    frame_fds[0] = sent                      # forwarded, then closed by the link
    # The front-end's fd stays as it is (O_NONBLOCK is shared with the
    # front-end's own copy): it is read only once the loop saw it readable.
    if kind == "kick":
        return Notifier(kind, index, read_fd=theirs, write_fd=mine)
    return Notifier(kind, index, read_fd=mine, write_fd=theirs)
