"""The back-end's central, bounded buffer of timed events (the ``events``
op of the introspection protocol, inspector/introspect/__init__.py, reads
it). Records are inspector.events.EVENT_RECORD, as devices drain them
(inspector/devices/base.py, ``Device.drain_events``).
"""

from __future__ import annotations

import array
import mmap
import sys

from ..errors import ArgumentError
from ..events import EVENT_KIND_NAMES, EVENT_RECORD

EVENT_BUFFER = 1 << 20       # events' worth of memory the central buffer keeps (16 bytes each: 16 MiB)
# Events' worth of records per chunk slot: the buffer keeps at most
# EVENT_BUFFER / CHUNK_OVERHEAD chunks. A quiet back-end's 50 ms drains hold
# one or two events each; without a bound on chunks their bookkeeping, not
# their records, would be what grows.
CHUNK_OVERHEAD = 10
EVENTS_PER_REPLY = 65536     # most events one "events" reply carries
_RECORD = EVENT_RECORD.size


class EventBuffer:
    """The server's central, bounded buffer of timed events.

    ``capacity``: records kept (at least 1); ``max_chunks``: chunk slots
    (default below). ArgumentError for a bound below 1.

    Events are appended in chunks of packed records (one per drained vring
    log, inspector.events.EVENT_RECORD, 16 bytes each) and numbered with a
    global sequence number from 0. The memory is allocated once and reused:
    records are copied into one ring of ``capacity`` records (an anonymous
    mapping of capacity x 16 bytes, touched as it fills) and each chunk is
    described by one slot of fixed-size index arrays (``max_chunks`` slots,
    by default capacity / CHUNK_OVERHEAD and at least 64: first seq,
    position, count, queue; a list slot for the device name; a chunk that
    crosses the ring's end takes two).
    When either is full the oldest chunks go. Nothing is allocated per
    chunk that outlives :meth:`add`: a back-end under load drains
    variable-sized chunks every 50 ms for hours, and keeping them as
    separate objects let the allocator's fragmentation grow the process.
    Records are decoded
    only when read. Readers keep their own cursor (:meth:`read`).

    Within one queue events are in time order; across queues they are in
    drain order (sort by ``time_ns`` where it matters). ``dropped``: events
    the devices' logs lost (full) since the buffer was made, cumulative.
    Not thread-safe: the server calls it under its lock.
    """

    def __init__(self, capacity: int = EVENT_BUFFER, max_chunks: int | None = None):
        if capacity < 1:
            raise ArgumentError(f"EventBuffer: capacity {capacity} must be at least 1")
        self.capacity = capacity
        self.max_chunks = max_chunks if max_chunks is not None else max(64, capacity // CHUNK_OVERHEAD)
        if self.max_chunks < 1:
            raise ArgumentError(f"EventBuffer: max_chunks {self.max_chunks} must be at least 1")
        self._ring = mmap.mmap(-1, capacity * _RECORD)
        m = self.max_chunks
        self._first = array.array("q", bytes(8 * m))   # seq of the chunk's first record
        self._pos = array.array("q", bytes(8 * m))     # its first record's index in the ring
        self._count = array.array("q", bytes(8 * m))   # records in it (never across the ring's end)
        self._queue = array.array("q", bytes(8 * m))
        self._device: list[str | None] = [None] * m
        self._tail = 0       # slot of the oldest chunk
        self.chunks = 0      # chunks held
        self.held = 0        # records held
        self._head = 0       # ring index of the next record written
        self.next_seq = 0
        self.dropped = 0

    @property
    def oldest_seq(self) -> int:
        return self._first[self._tail] if self.chunks else self.next_seq

    def _evict_oldest(self) -> None:
        t = self._tail
        self.held -= self._count[t]
        self._device[t] = None
        self._tail = (t + 1) % self.max_chunks
        self.chunks -= 1

    def _push(self, first: int, device: str, queue: int, records) -> None:
        """One chunk that fits at ``_head`` without crossing the ring's end."""
        n = len(records) // _RECORD
        while self.held + n > self.capacity or self.chunks == self.max_chunks:
            self._evict_oldest()
        s = (self._tail + self.chunks) % self.max_chunks
        h = self._head
        self._ring[h * _RECORD:(h + n) * _RECORD] = records
        self._first[s], self._pos[s], self._count[s] = first, h, n
        self._queue[s], self._device[s] = queue, device
        self.chunks += 1
        self.held += n
        self._head = (h + n) % self.capacity

    def add(self, device: str, queue: int, records) -> None:
        """Append one vring's drained events (packed records, oldest first;
        bytes-like). More than ``capacity`` at once: only the newest stay."""
        n = len(records) // _RECORD
        if not n:
            return
        view = memoryview(records)[:n * _RECORD]
        first = self.next_seq
        self.next_seq += n
        if n > self.capacity:
            view, first = view[(n - self.capacity) * _RECORD:], first + n - self.capacity
            n = self.capacity
        device = sys.intern(device)
        room = self.capacity - self._head    # records before the ring's end
        if n > room:
            self._push(first, device, queue, view[:room * _RECORD])
            view, first = view[room * _RECORD:], first + room
        self._push(first, device, queue, view)

    def _slot(self, k: int) -> int:
        return (self._tail + k) % self.max_chunks

    def read(self, since: int, limit: int = EVENTS_PER_REPLY, binary: bool = False):
        """Events with sequence number >= ``since``, at most ``limit``:
        ``{"next": M, "head": H, "dropped": D, "gap": G, "events": [[time_ns,
        device, queue, kind, value], ...]}``. ``next``: the cursor for the
        next call; ``head``: the sequence number the next event will get
        (``head - next``: events this reader has still to read);
        ``gap``: events >= ``since`` that left the buffer before this read (a
        slow reader's loss). A ``since`` beyond ``next_seq`` (a cursor from an
        earlier server) reads from the oldest event.

        ``binary``: ``(header, records)`` instead, the header without
        ``events`` but with ``"chunks": [[device, queue, n], ...]`` and
        ``"binary": len(records)``; ``records`` the events' packed
        EVENT_RECORDs (16 bytes: u64 time_ns, u32 kind code, u32 value;
        EVENT_KIND_NAMES), chunk after chunk: copied, never decoded (far
        cheaper per event than building the JSON lists)."""
        if since > self.next_seq:
            since = 0
        oldest = self.oldest_seq
        gap = max(0, oldest - since)
        start = max(since, oldest)
        # The chunk holding ``start``: the last one whose first seq is <= start.
        lo, hi = 0, self.chunks
        while lo < hi:
            mid = (lo + hi) // 2
            if self._first[self._slot(mid)] <= start:
                lo = mid + 1
            else:
                hi = mid
        names = EVENT_KIND_NAMES
        out: list[list] = []
        chunks: list[list] = []
        parts: list[memoryview] = []
        records = b""
        n = 0
        ring = memoryview(self._ring)
        try:
            for k in range(max(0, lo - 1), self.chunks):
                if n >= limit:
                    break
                s = self._slot(k)
                first, pos, count = self._first[s], self._pos[s], self._count[s]
                off = max(0, start - first)
                take = min(count - off, limit - n)
                if take <= 0:
                    continue
                n += take
                device, queue = self._device[s], self._queue[s]
                part = ring[(pos + off) * _RECORD:(pos + off + take) * _RECORD]
                parts.append(part)
                if binary:
                    chunks.append([device, queue, take])
                else:
                    out += [[t, device, queue, names.get(kd, "unknown"), v]
                            for t, kd, v in EVENT_RECORD.iter_unpack(part)]
            if binary:
                records = b"".join(parts)      # the one copy out of the ring
        finally:
            for part in parts:
                part.release()
            ring.release()
        head = {"next": start + n, "head": self.next_seq, "dropped": self.dropped, "gap": gap}
        if binary:
            return {**head, "chunks": chunks, "binary": len(records)}, records
        return {**head, "events": out}
