"""A vhost-user server: Unix-socket listener, event loop, connection lifecycle.

The event loop (``selectors``, one thread) accepts front-ends on the
vhost-user socket, gives each a new device from the factory and a
:class:`BackendConnection`, and feeds it readable events. A connection that
breaks the protocol or goes away is closed; the server keeps accepting.

The same loop serves the introspection endpoint, a second Unix socket
(inspector/introspect/server.py; the protocol is described in
inspector/introspect/__init__.py), with non-blocking sockets and bounded
buffers, so a slow or silent reader never blocks vhost-user traffic, and a
snapshot never races with a memory table being replaced. Both sockets are
created mode 0600 (introspect.server.listen_unix).

vhost-user reads never block: each connection assembles its message across
readable events, so a front-end stalling mid-message holds only itself; one
that stays stalled longer than ``STALL_TIMEOUT_S`` is broken and closed
(checked every ``STALL_CHECK_S``).

Events: every ``event_poll_s`` (and before answering any introspection
request) the loop drains each device's per-vring event logs
(``Device.drain_events``) into one bounded central buffer
(introspect.buffer.EventBuffer) that numbers events with a global sequence
number; each introspection reader reads it with its own cursor (op
``events``), so several readers each see every event. vhost-user message
log entries are numbered the same way (op ``messages`` with ``since``).
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from typing import Callable

from ..devices.base import Device
from ..introspect.buffer import EVENT_BUFFER, EventBuffer
from ..snapshot.codec import to_json
from ..snapshot.model import Snapshot
from .backend import BackendConnection
from .loop import SocketLoop

STALL_CHECK_S = 0.5

logger = logging.getLogger("inspector.vhost_user")
EVENT_POLL_S = 0.05          # device event logs are drained this often


class VhostUserServer(SocketLoop):
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
    .device, .vrings, .mem, .features, .broken, .log). ``introspection``:
    the :class:`~inspector.introspect.server.IntrospectionServer` answering
    readers (its protocol: inspector/introspect/__init__.py).
    """

    LOG_NAME = "vhost-user server"
    THREAD_NAME = "vhost-user-server"
    logger = logger

    def __init__(self, socket_path: str, device_factory: Callable[[], Device],
                 introspect_path: str | None = None,
                 snapshot_fn: Callable[["VhostUserServer"], Snapshot] | None = None,
                 event_poll_s: float | None = EVENT_POLL_S, event_buffer: int = EVENT_BUFFER,
                 introspect_any_uid: bool = False, stall_timeout: float | None = None):
        super().__init__(socket_path, introspect_path, introspect_any_uid=introspect_any_uid)
        self.stall_timeout = stall_timeout
        self._next_stall_check = 0.0
        self.device_factory = device_factory
        self.snapshot_fn = snapshot_fn
        self.connections: list[BackendConnection] = []
        self.accepted = 0
        self._next_id = 0
        self.event_poll_s = event_poll_s
        self.events = EventBuffer(event_buffer)
        self._ev_lock = threading.Lock()
        self._ev_dropped: dict[tuple[int, int], int] = {}  # (connection, vring) -> log drops seen
        self._ev_queues: dict[int, set[int]] = {}          # connection -> vrings that ran
        self._next_drain = 0.0

    # --- loop (inspector/vhost_user/loop.py runs it) ------------------------------------------
    def _timers(self) -> float:
        """Drain the devices' event logs every ``event_poll_s`` and close
        stalled connections every STALL_CHECK_S; the seconds until the next."""
        period = self.event_poll_s
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
        return min(timeout, max(0.0, self._next_stall_check - now))

    def _handle(self, kind: str, conn: BackendConnection, events: int) -> None:
        if not self._readable(conn):
            self._drop(conn)

    def _failed(self, kind: str, conn: BackendConnection) -> None:
        self._drop(conn)

    def _close_all(self) -> None:
        for conn in list(self.connections):
            self._drop(conn)

    def _accept(self, sock) -> None:
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
        finished it within their stall timeout; ask again for the IOTLB
        misses of ring areas still unanswered (inspector/vhost_user/iotlb.py)."""
        for conn in list(self.connections):
            if conn.stalled(now):
                self._drop(conn)
            else:
                conn.iotlb.retry()

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

    # --- what introspection reads (inspector/introspect/server.py) -----------------
    def introspection_snapshot(self, chains: bool = True) -> dict:
        """The Snapshot JSON: of ``snapshot_fn(self)``, or of an empty
        snapshot without it (the codec is the one place JSON is built);
        without chains when ``chains`` is False."""
        if self.snapshot_fn is None:
            return to_json(Snapshot(source=f"vqscope serve {self.socket_path}", time=time.time()), chains)
        return to_json(self.snapshot_fn(self), chains)

    def read_events(self, since: int, limit: int, binary: bool):
        """:meth:`EventBuffer.read` of :attr:`events`, under its lock."""
        with self._ev_lock:
            return self.events.read(since, limit, binary=binary)

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
        drain = conn.device.drain_events
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
