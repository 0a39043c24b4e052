"""A vhost-user server: Unix-socket listener, event loop, introspection.

The event loop (``selectors``, one thread) accepts front-ends on the
vhost-user socket, gives each a new device from the factory and a
:class:`BackendConnection`, and feeds it readable events. A connection that
breaks the protocol or goes away is closed; the server keeps accepting.

The introspection endpoint is a second Unix socket serving read-only,
newline-delimited JSON (inspector/sources/backend.py documents the client
side). It runs in the same loop with non-blocking sockets and bounded
buffers, so a slow or silent client never blocks vhost-user traffic, and a
snapshot never races with a memory table being replaced.

Both sockets are created mode 0600 (chmod between bind and listen: no one
can connect before listen, so there is no window). The introspection
endpoint also checks each reader's uid (SO_PEERCRED) on accept: only the
server's own uid and root are served unless ``introspect_any_uid``; others
get one log line and a closed socket. It has no operation that changes
anything (``INTROSPECT_OPS``).

vhost-user reads never block: each connection assembles its message across
readable events, so a front-end stalling mid-message holds only itself; one
that stays stalled longer than ``STALL_TIMEOUT_S`` is broken and closed
(checked every ``STALL_CHECK_S``).

Events: every ``event_poll_s`` (and before answering any introspection
request) the loop drains each device's per-vring event logs
(``Device.drain_events``, optional) into one bounded central buffer that
numbers events with a global sequence number; each introspection client
reads it with its own cursor (op ``events``), so several clients each see
every event. vhost-user message log entries are numbered the same way
(op ``messages`` with ``since``).
"""

from __future__ import annotations

import array
import collections
import errno
import json
import logging
import mmap
import os
import selectors
import socket
import stat
import struct
import sys
import threading
import time
from typing import Callable

from ..devices.base import Device
from ..errors import InspectorError
from ..events import EVENT_KIND_NAMES, EVENT_RECORD
from ..snapshot.codec import to_json
from ..snapshot.model import Snapshot
from .backend import BackendConnection

# Every introspection operation; each only reads. Anything else is refused.
INTROSPECT_OPS = ("snapshot", "messages", "events")
STALL_CHECK_S = 0.5

logger = logging.getLogger("inspector.vhost_user")

_MAX_REQUEST_LINE = 64 * 1024
_MAX_PENDING_OUT = 64 * 1024 * 1024
_CLOSED_LOGS_KEPT = 16
EVENT_POLL_S = 0.05          # device event logs are drained this often
EVENT_BUFFER = 1 << 20       # events' worth of memory the central buffer keeps (16 bytes each: 16 MiB)
# Events' worth of records per chunk slot: the buffer keeps at most
# EVENT_BUFFER / CHUNK_OVERHEAD chunks. A quiet back-end's 50 ms drains hold
# one or two events each; without a bound on chunks their bookkeeping, not
# their records, would be what grows (measured: +18 MB in 15 minutes of the
# demo when chunks were separate objects).
CHUNK_OVERHEAD = 10
EVENTS_PER_REPLY = 65536     # most events one "events" reply carries
_RECORD = EVENT_RECORD.size


class EventBuffer:
    """The server's central, bounded buffer of timed events.

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
    separate objects let the allocator's fragmentation grow the process
    (measured: +4 to +9 % RSS over a 10-minute soak). Records are decoded
    only when read. Readers keep their own cursor (:meth:`read`).

    Within one queue events are in time order; across queues they are in
    drain order (sort by ``time_ns`` where it matters). ``dropped``: events
    the devices' logs lost (full) since the buffer was made, cumulative.
    Not thread-safe: the server calls it under its lock.
    """

    def __init__(self, capacity: int = EVENT_BUFFER, max_chunks: int | None = None):
        if capacity < 1:
            raise ValueError(f"EventBuffer: capacity {capacity} must be at least 1")
        self.capacity = capacity
        self.max_chunks = max_chunks if max_chunks is not None else max(64, capacity // CHUNK_OVERHEAD)
        if self.max_chunks < 1:
            raise ValueError(f"EventBuffer: max_chunks {self.max_chunks} must be at least 1")
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
        EVENT_KIND_NAMES), chunk after chunk: copied, never decoded (make
        bench-record: ~9 ns per event against ~0.64 us as JSON, quiet)."""
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


def _listen_unix(path: str) -> socket.socket:
    """A listening Unix stream socket at ``path``, mode 0600. A stale socket
    file (nobody listening) is removed; a live one or a non-socket file is an
    error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise InspectorError(f"{path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise InspectorError(f"cannot check the socket {path}: {e.strerror}") from e
            os.unlink(path)
        else:
            raise InspectorError(f"{path} is in use by a running server; choose another path")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(16)
    except OSError as e:
        s.close()
        raise InspectorError(f"cannot listen on {path}: {e.strerror}") from e
    s.setblocking(False)
    return s


class _IntrospectClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class VhostUserServer:
    """Serve vhost-user on ``socket_path``; one device per connection.

    ``device_factory()`` makes a Device for each new front-end.
    ``introspect_path``: where to serve introspection (None: not served).
    ``snapshot_fn(server)`` builds the Snapshot (inspector.snapshot.model;
    inspector/introspect/snapshot.py), sent as its JSON.
    ``event_poll_s``: period of draining the devices' event logs into
    ``events`` (an :class:`EventBuffer` of ``event_buffer`` events); None:
    only when an introspection request comes (tests use it to let a device
    log fill up).

    ``introspect_any_uid``: serve introspection readers of any uid (by
    default only this process's uid and root, checked with SO_PEERCRED).
    ``stall_timeout``: seconds a front-end may take to finish a message it
    began before its connection is closed.

    ``connections`` lists the live BackendConnections (each with .id,
    .device, .vrings, .mem, .features, .broken, .log).
    """

    def __init__(self, socket_path: str, device_factory: Callable[[], Device],
                 introspect_path: str | None = None,
                 snapshot_fn: Callable[["VhostUserServer"], Snapshot] | None = None,
                 event_poll_s: float | None = EVENT_POLL_S, event_buffer: int = EVENT_BUFFER,
                 introspect_any_uid: bool = False, stall_timeout: float | None = None):
        self.socket_path = socket_path
        self.introspect_any_uid = introspect_any_uid
        self.stall_timeout = stall_timeout
        self.refused_readers = 0
        self._next_stall_check = 0.0
        self.device_factory = device_factory
        self.introspect_path = introspect_path
        self.snapshot_fn = snapshot_fn
        self.connections: list[BackendConnection] = []
        self.closed_logs: collections.deque[tuple[int, list[dict]]] = collections.deque(
            maxlen=_CLOSED_LOGS_KEPT)
        self.accepted = 0
        self._next_id = 0
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._ilistener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.event_poll_s = event_poll_s
        # Names this server among others on the same path (a restarted
        # back-end starts its sequence numbers at 0 again): every events and
        # messages reply carries it, and a client whose instance changed
        # reads from 0 (inspector/sources/backend.py).
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.events = EventBuffer(event_buffer)
        self._ev_lock = threading.Lock()
        self._ev_dropped: dict[tuple[int, int], int] = {}  # (connection, vring) -> log drops seen
        self._ev_queues: dict[int, set[int]] = {}          # connection -> vrings that ran
        self._next_drain = 0.0
        self._msg_seq = 0

    # --- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Create the sockets (done by start() / serve_forever() if needed)."""
        if self._sel is not None:
            return
        self._listener = _listen_unix(self.socket_path)
        try:
            if self.introspect_path:
                self._ilistener = _listen_unix(self.introspect_path)
        except BaseException:
            self._listener.close()
            os.unlink(self.socket_path)
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        if self._ilistener is not None:
            self._sel.register(self._ilistener, selectors.EVENT_READ, ("ilisten", None))
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stopping = False

    def start(self) -> "VhostUserServer":
        """Listen now and run the loop in a daemon thread."""
        self.open()
        self._thread = threading.Thread(target=self._run, name="vhost-user-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Listen and run the loop in this thread until stop()."""
        self.open()
        self._run()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, close every connection and remove the sockets.
        Safe from any thread and from signal handlers."""
        self._stopping = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            self._thread = None

    def __enter__(self) -> "VhostUserServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- loop -----------------------------------------------------------------------
    def _run(self) -> None:
        sel = self._sel
        period = self.event_poll_s
        try:
            while not self._stopping:
                if period is not None:
                    now = time.monotonic()
                    if now >= self._next_drain:
                        self.drain_events()
                        self._next_drain = now + period
                    timeout = max(0.0, self._next_drain - now)
                else:
                    timeout = 1.0
                now = time.monotonic()
                if now >= self._next_stall_check:
                    self._check_stalls(now)
                    self._next_stall_check = now + STALL_CHECK_S
                timeout = min(timeout, max(0.0, self._next_stall_check - now))
                for key, events in sel.select(timeout=timeout):
                    kind, obj = key.data
                    try:
                        if kind == "listen":
                            self._accept()
                        elif kind == "conn":
                            if not self._readable(obj):
                                self._drop(obj)
                        elif kind == "ilisten":
                            self._iaccept()
                        elif kind == "iclient":
                            self._iservice(obj, events)
                        elif kind == "wake":
                            try:
                                self._wake_r.recv(64)
                            except OSError:
                                pass
                    except Exception:
                        logger.exception("vhost-user server: unexpected error handling %s", kind)
                        if kind == "conn":
                            self._drop(obj)
                        elif kind == "iclient":
                            self._iclose(obj)
                    if self._stopping:
                        break
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for conn in list(self.connections):
            self._drop(conn)
        sel, self._sel = self._sel, None
        if sel is not None:
            for key in list(sel.get_map().values()):
                kind, obj = key.data
                if kind == "iclient":
                    obj.sock.close()
            sel.close()
        for s, path in ((self._listener, self.socket_path), (self._ilistener, self.introspect_path)):
            if s is not None:
                s.close()
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._listener = self._ilistener = None
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE etc.: log, keep serving
            logger.warning("vhost-user server: accept failed: %s", e)
            return
        try:
            device = self.device_factory()
        except Exception as e:
            logger.error("vhost-user server: cannot create a device for a new front-end: %s", e)
            sock.close()
            return
        self._next_id += 1
        kw = {} if self.stall_timeout is None else {"stall_timeout": self.stall_timeout}
        try:
            conn = BackendConnection(sock, device, logger, conn_id=self._next_id, **kw)
        except Exception as e:
            logger.error("vhost-user server: cannot set up connection %d: %s", self._next_id, e)
            try:
                device.close()
            finally:
                sock.close()
            return
        self.accepted += 1
        with self._lock:
            self.connections.append(conn)
        self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        logger.info("front-end connected (connection %d, device %s)", conn.id, device.name)

    def _check_stalls(self, now: float) -> None:
        """Close the connections whose front-end began a message and has not
        finished it within their stall timeout."""
        for conn in list(self.connections):
            if conn.stalled(now):
                self._drop(conn)

    def _readable(self, conn: BackendConnection) -> bool:
        try:
            return conn.handle_readable()
        finally:
            self._stamp_messages(conn)

    def _stamp_messages(self, conn: BackendConnection) -> None:
        """Give the connection's newly logged messages their ``seq``
        (one message is read per readable event, so none left the bounded
        log unnumbered)."""
        with self._lock:
            new = []
            for entry in reversed(conn.log):
                if "seq" in entry:
                    break
                new.append(entry)
            for entry in reversed(new):
                entry["seq"] = self._msg_seq
                self._msg_seq += 1

    def _drop(self, conn: BackendConnection) -> None:
        try:
            if self._sel is not None:
                self._sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        with self._lock:
            if conn in self.connections:
                self.connections.remove(conn)
            self.closed_logs.append((conn.id, list(conn.log)))
        conn.close()
        # The device stopped its vrings and kept their events: take them now.
        self._drain_connection(conn, range(conn.num_queues))
        with self._ev_lock:
            self._ev_queues.pop(conn.id, None)
            for key in [k for k in self._ev_dropped if k[0] == conn.id]:
                del self._ev_dropped[key]
        logger.info("connection %d closed%s", conn.id,
                    f" (broken: {conn.broken_reason})" if conn.broken else "")

    # --- introspection ---------------------------------------------------------------
    def _iaccept(self) -> None:
        try:
            sock, _ = self._ilistener.accept()
        except OSError:
            return
        if not self.introspect_any_uid:
            try:
                pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                     struct.calcsize("3i")))
            except OSError as e:
                logger.warning("introspection: cannot read the reader's credentials: %s; refused", e)
                sock.close()
                return
            if uid not in (os.geteuid(), 0):
                self.refused_readers += 1
                logger.warning("introspection: refused reader pid %d uid %d: only uid %d (and root) may "
                               "read this back-end (serve --introspect-any-uid allows any)",
                               pid, uid, os.geteuid())
                sock.close()
                return
        sock.setblocking(False)
        client = _IntrospectClient(sock)
        self._sel.register(sock, selectors.EVENT_READ, ("iclient", client))

    def _iclose(self, client: _IntrospectClient) -> None:
        try:
            self._sel.unregister(client.sock)
        except (KeyError, ValueError, OSError):
            pass
        client.sock.close()

    def _iservice(self, client: _IntrospectClient, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._iclose(client)
                return
            if data == b"":
                self._iclose(client)
                return
            if data:
                client.inbuf += data
                while b"\n" in client.inbuf:
                    line, _, rest = bytes(client.inbuf).partition(b"\n")
                    client.inbuf = bytearray(rest)
                    if line.strip():
                        client.outbuf += self.introspect_reply(line)
                if len(client.inbuf) > _MAX_REQUEST_LINE or len(client.outbuf) > _MAX_PENDING_OUT:
                    self._iclose(client)
                    return
        if client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
                del client.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._iclose(client)
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        self._sel.modify(client.sock, want, ("iclient", client))

    def introspect_reply(self, line: bytes | str) -> bytes:
        """The bytes answering one request line: a JSON line, followed for a
        binary ``events`` reply by its ``binary`` bytes of records."""
        reply = self.introspect(line)
        if isinstance(reply, tuple):
            header, payload = reply
            return json.dumps(header).encode() + b"\n" + payload
        return json.dumps(reply).encode() + b"\n"

    def introspect(self, line: bytes | str) -> dict | tuple[dict, bytes]:
        """Answer one introspection request line (read-only ops only): the
        reply object, or for ``events`` with ``"binary": true`` the header
        and the records (:meth:`EventBuffer.read`)."""
        try:
            req = json.loads(line)
            op = req.get("op") if isinstance(req, dict) else None
        except ValueError as e:
            return {"error": f"request is not JSON: {e}"}
        except RecursionError:
            return {"error": "request is not a flat JSON object: it nests too deeply"}
        if op not in INTROSPECT_OPS:
            return {"error": f"unknown op {op!r}: the ops are \"snapshot\", \"messages\" and \"events\" "
                             f"(all read-only)"}
        since = req.get("since") if op in ("events", "messages") else None
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            return {"error": f"{op}: since {since!r} is invalid: give the \"next\" of the previous "
                             f"reply, or 0"}
        self.drain_events()
        if op == "events":
            limit = req.get("limit", EVENTS_PER_REPLY)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                return {"error": f"events: limit {limit!r} is invalid: give a positive integer"}
            binary = req.get("binary", False)
            if not isinstance(binary, bool):
                return {"error": f"events: binary {binary!r} is invalid: give true or false"}
            with self._ev_lock:
                reply = self.events.read(since or 0, min(limit, EVENTS_PER_REPLY), binary=binary)
            if binary:
                return {**reply[0], "instance": self.instance}, reply[1]
            return {**reply, "instance": self.instance}
        if op == "snapshot":
            if self.snapshot_fn is None:
                return to_json(Snapshot(source=f"vqscope serve {self.socket_path}", time=time.time()))
            try:
                return to_json(self.snapshot_fn(self))
            except Exception as e:
                logger.warning("introspection: snapshot failed: %s", e)
                return {"error": f"snapshot failed: {type(e).__name__}: {e}"}
        if op == "messages":
            msgs, next_seq = self.message_log(since)
            return {"messages": msgs, "next": next_seq, "instance": self.instance}
        raise AssertionError(f"op {op!r} is in INTROSPECT_OPS but not handled")

    # --- events ----------------------------------------------------------------------------
    def drain_events(self) -> None:
        """Move every device's logged events into :attr:`events` (the loop
        calls it every ``event_poll_s`` and before each introspection reply)."""
        for conn in list(self.connections):
            with self._ev_lock:
                ran = self._ev_queues.setdefault(conn.id, set())
                ran.update(v.index for v in list(conn.vrings) if v.started)
                queues = sorted(ran)
            self._drain_connection(conn, queues)

    def _drain_connection(self, conn: BackendConnection, queues) -> None:
        drain = getattr(conn.device, "drain_events", None)
        if drain is None:
            return
        name = f"{conn.device.name}{conn.id}"
        with self._ev_lock:
            ran = self._ev_queues.get(conn.id, set())
            for i in queues:
                try:
                    records, dropped = drain(i)
                except Exception as e:  # a failing device must not stop the loop
                    logger.warning("connection %d: draining events of vring %d failed: %s",
                                   conn.id, i, e)
                    continue
                self.events.add(name, i, records)
                seen = self._ev_dropped.get((conn.id, i), 0)
                if dropped > seen:
                    self.events.dropped += dropped - seen
                    self._ev_dropped[conn.id, i] = dropped
                if not records and i < len(conn.vrings) and not conn.vrings[i].started:
                    ran.discard(i)  # stopped and drained: nothing more will come

    # --- messages --------------------------------------------------------------------------
    def messages(self, since: int | None = None) -> list[dict]:
        """The message logs of recently closed and live connections, each
        entry with its ``connection`` id and ``seq`` (a server-wide number,
        in arrival order), in arrival order; with ``since``, only entries
        whose seq is >= since."""
        return self.message_log(since)[0]

    def message_log(self, since: int | None = None) -> tuple[list[dict], int]:
        """:meth:`messages` and the ``next`` cursor (the seq the next
        logged message will get). A ``since`` beyond it (a cursor from an
        earlier server) reads from the start."""
        for _ in range(10):  # the loop thread may append meanwhile
            try:
                with self._lock:
                    logs = list(self.closed_logs) + [(c.id, list(c.log)) for c in self.connections]
                    next_seq = self._msg_seq
                break
            except RuntimeError:
                continue
        else:
            logs, next_seq = [], self._msg_seq
        if since is not None and since > next_seq:
            since = 0
        out = [dict(e, connection=cid) for cid, entries in logs for e in entries
               if "seq" in e and (since is None or e["seq"] >= since)]
        out.sort(key=lambda e: e["seq"])
        return out, next_seq
