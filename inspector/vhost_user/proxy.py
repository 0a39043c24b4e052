"""``vqscope proxy``: a transparent vhost-user proxy between a front-end
(QEMU, DPDK virtio-user) and a third-party back-end (DPDK, SPDK,
qemu-storage-daemon), to watch the back-end's rings and messages live.

The event loop (``selectors``, one thread, like inspector/vhost_user/
server.py) listens on the front-end's socket; for each front-end accepted it
connects to the back-end's socket and relays every message both ways, byte
for byte, with its fds (inspector/vhost_user/proxy_link.py frames them):

- front-end -> back-end requests ("front-end" in the message log) and the
  back-end's replies ("back-end");
- the back-end request channel (SET_BACKEND_REQ_FD, spec "Back-end
  communication"): the proxy keeps the front-end's socket, makes a socket
  pair, and sends the back-end one end of it in place of the front-end's,
  then relays requests back-end -> front-end ("backend-req") and their
  REPLY_ACK replies ("backend-req-reply").

It never originates a message (no GET_VRING_BASE, ever) and never writes
guest memory. Kick and call eventfds are forwarded unchanged, so the data
path never passes through the proxy.

Faults are passed on: either side hanging up closes the other side's
connection and drops the connection's state (fds, channel), so a front-end
with QEMU's ``reconnect`` connects again and the proxy connects to the
back-end again; a back-end that cannot be connected to closes the
front-end's connection. A malformed message is forwarded as-is and logged
once, naming request, field and value.

Logs (logger ``inspector.proxy``): ``proxy: listening on FRONT, back-end
BACK``, ``proxy: connection N: front-end connected, back-end connected``,
``proxy: connection N closed: WHY``, ``proxy: connection N: DIRECTION
REQUEST: FIELD VALUE: WHAT (forwarded as-is)``.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import time

from ..errors import InspectorError
from ..introspect.buffer import EVENT_BUFFER, EventBuffer
from ..introspect.proxy_snapshot import proxy_snapshot
from ..snapshot.codec import to_json
from .loop import SocketLoop
from .protocol import MAX_PAYLOAD, VRING_IDX_MASK, VRING_NOFD_MASK, ProtocolViolation, Request, payload_fields
from .proxy_link import Frame, LinkClosed, LinkSide
from .proxy_notify import Notifier, interpose, is_eventfd
from .proxy_state import ConnectionState, decode_backend_message, message_name

logger = logging.getLogger("inspector.proxy")

#: Period of moving relayed kicks and calls into the event buffer (as serve's).
EVENT_POLL_S = 0.05
#: Seconds to wait for the back-end's socket to accept a connection.
CONNECT_TIMEOUT_S = 2.0
#: While the back-end is down, how often the proxy tries to connect to it.
BACKEND_PROBE_S = 0.5
#: Message log entries kept per connection (SocketLoop keeps the last closed ones' logs).
LOG_SIZE = 4096

#: The vring fd requests whose eventfd --count-notifications relays.
_NOTIFY_KINDS = {Request.SET_VRING_KICK: "kick", Request.SET_VRING_CALL: "call"}

#: Message-log direction names -> link-stats keys.
DIRECTIONS = {"front-end": "front_end", "back-end": "back_end",
              "backend-req": "backend_req", "backend-req-reply": "backend_req_reply"}


class ProxyConnection:
    """One proxied front-end: its link to the back-end and what passed.

    ``id``: the connection number (1, 2, ...); ``front`` / ``back``: the
    :class:`~.proxy_link.LinkSide` of the front-end's and the back-end's
    connection; ``channel``: the two sides of the back-end request channel
    (front-end's socket, proxy's end of the pair given to the back-end), or
    None; ``log``: the bounded message log (dicts {time, request, flags,
    size, nfds, fields, direction, malformed}, ``seq`` added by the proxy).
    """

    def __init__(self, conn_id: int, front: socket.socket, back: socket.socket, proxy: "VhostUserProxy"):
        self.id = conn_id
        self.proxy = proxy
        self.log: collections.deque[dict] = collections.deque(maxlen=LOG_SIZE)
        self.front = LinkSide(front, "front-end", "front-end", self._on_message, self._on_oversize)
        self.back = LinkSide(back, "back-end", "back-end", self._on_message, self._on_oversize)
        self.front.peer, self.back.peer = self.back, self.front
        self.channel: tuple[LinkSide, LinkSide] | None = None
        self.state = ConnectionState(logger, conn_id)
        self.notifiers: dict[tuple[str, int], Notifier] = {}
        # Counters of replaced back-end request channels, summed by
        # direction (a front-end may send SET_BACKEND_REQ_FD any number of
        # times: only the sums are kept, not the sides).
        self._retired: dict[str, dict[str, int]] = {}
        self.closed = False

    @property
    def sides(self) -> list[LinkSide]:
        sides = [self.front, self.back]
        if self.channel is not None:
            sides += self.channel
        return sides

    def link_stats(self) -> dict:
        """Per direction {"messages", "bytes", "fds"} in and ``*_out`` out,
        and ``proxy_originated`` (always 0: the proxy sends nothing of its own)."""
        stats = {key: {"messages": 0, "bytes": 0, "fds": 0, "messages_out": 0, "bytes_out": 0, "fds_out": 0}
                 for key in DIRECTIONS.values()}
        for side in self.sides:
            stats[DIRECTIONS[side.direction]] = side.counters.as_dict()
        for key, counts in self._retired.items():
            for k, v in counts.items():
                stats[key][k] += v
        stats["proxy_originated"] = 0
        return stats

    # --- messages -------------------------------------------------------------------
    def malformed(self, side: LinkSide, frame: Frame, field: str, value, why: str) -> str:
        """Log one malformed message (forwarded as-is); the text for the message log."""
        text = f"{field} {value}: {why}"
        logger.warning("proxy: connection %d: %s %s: %s (forwarded as-is)", self.id, _side_label(side),
                       message_name(side.direction, frame.request), text)
        return text

    def _entry(self, side: LinkSide, frame: Frame, fields: dict | None = None,
               malformed: str | None = None) -> dict:
        entry = {"time": time.time(), "request": message_name(side.direction, frame.request), "flags": frame.flags,
                 "size": frame.size, "nfds": len(frame.fds), "fields": fields or {},
                 "direction": side.direction, "malformed": malformed}
        self.proxy.stamp(entry, self.log)
        return entry

    def _on_oversize(self, side: LinkSide, frame: Frame) -> None:
        why = self.malformed(side, frame, "size", frame.size,
                             f"exceeds the largest request payload ({MAX_PAYLOAD} bytes); payload streamed through")
        self._entry(side, frame, malformed=why)

    def _on_message(self, side: LinkSide, frame: Frame) -> None:
        """Decode a whole message, update the state, log it; interpose the
        back-end request channel. The frame is forwarded whatever happens."""
        malformed = fields = None
        if frame.truncated:
            malformed = self.malformed(side, frame, "fds", f">{len(frame.fds)}",
                                       "more fds than the control buffer holds; the kernel dropped the rest")
        else:
            try:
                fields = self._decode(side, frame)
            except ProtocolViolation as e:
                malformed = self.malformed(side, frame, e.field, e.shown, e.why)
        if malformed is None and side is self.front:
            if frame.request == Request.SET_BACKEND_REQ_FD:
                self._interpose_channel(frame)
            elif frame.request in _NOTIFY_KINDS and self.proxy.count_notifications:
                self._interpose_notifier(_NOTIFY_KINDS[frame.request], fields["u64"], frame)
        self._entry(side, frame, fields, malformed)

    def _decode(self, side: LinkSide, frame: Frame) -> dict:
        if side.direction == "front-end":
            return self.state.front_end_message(frame)
        if side.direction == "back-end":
            return self.state.back_end_message(frame)
        req, payload = decode_backend_message(frame, reply=side.direction == "backend-req-reply")
        if side.direction != "backend-req-reply":
            self.state.backend_request(req, payload)
        return payload_fields(payload)

    # --- --count-notifications -----------------------------------------------------
    def _interpose_notifier(self, kind: str, u64: int, frame: Frame) -> None:
        """SET_VRING_KICK / SET_VRING_CALL: relay through an eventfd of the
        proxy's (inspector/vhost_user/proxy_notify.py); NOFD (bit 8) or an
        fd that is no eventfd passes through untouched."""
        index = u64 & VRING_IDX_MASK
        old = self.notifiers.pop((kind, index), None)
        if old is not None:
            self.proxy.unwatch_fd(old.read_fd)
            old.close()
        if u64 & VRING_NOFD_MASK or not frame.fds:
            return
        if not is_eventfd(frame.fds[0]):
            self.malformed(self.front, frame, "fd", frame.fds[0], "not an eventfd; passed through, not counted")
            return
        try:
            n = interpose(kind, index, frame.fds)
        except OSError as e:
            logger.warning("proxy: connection %d: cannot make an eventfd for vring %d's %s: %s; passed "
                           "through, not counted", self.id, index, kind, e.strerror or e)
            return
        if old is not None:
            n.count, n.records = old.count, old.records + n.records
        self.notifiers[kind, index] = n
        self.proxy.watch_fd(self, n)

    def notification_counts(self, index: int) -> tuple[int | None, int | None]:
        """(kicks, calls) of vring ``index`` relayed by the proxy; (None,
        None) unless it interposes the eventfds (--count-notifications)."""
        if not self.proxy.count_notifications:
            return None, None
        return tuple(n.count if (n := self.notifiers.get((k, index))) else 0 for k in ("kick", "call"))

    def drain_notifications(self):
        """(vring index, packed event records) of every relay since the last drain."""
        return [(n.index, n.drain()) for n in self.notifiers.values() if n.records]

    # --- back-end request channel ---------------------------------------------------
    def _interpose_channel(self, frame: Frame) -> None:
        """Keep the front-end's channel socket, give the back-end one end of
        a new socket pair instead, and relay between them."""
        try:
            front_chan = socket.socket(fileno=frame.fds[0])
        except OSError as e:
            self.malformed(self.front, frame, "fd", frame.fds[0], f"not a socket ({e.strerror or e}); not relayed")
            return
        if front_chan.type != socket.SOCK_STREAM or front_chan.family != socket.AF_UNIX:
            front_chan.detach()
            self.malformed(self.front, frame, "fd", frame.fds[0], "not a Unix stream socket; not relayed")
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        frame.fds[0] = theirs.detach()      # sent to the back-end, then closed by the link
        self._drop_channel()
        f = LinkSide(front_chan, "front-end's back-end request channel", "backend-req-reply",
                     self._on_message, self._on_oversize)
        b = LinkSide(mine, "back-end's back-end request channel", "backend-req",
                     self._on_message, self._on_oversize)
        f.peer, b.peer = b, f
        self.channel = (f, b)
        self.proxy.watch(self, f)
        self.proxy.watch(self, b)

    def _drop_channel(self) -> None:
        if self.channel is None:
            return
        for side in self.channel:
            self.proxy.unwatch(side)
            side.close()
        for side in self.channel:
            sums = self._retired.setdefault(DIRECTIONS[side.direction], {})
            for k, v in side.counters.as_dict().items():
                sums[k] = sums.get(k, 0) + v
        self.channel = None

    def side_closed(self, side: LinkSide, why: str) -> bool:
        """A side hung up or failed: True when the whole connection must
        close (a main socket); a channel side closes just the channel."""
        if self.channel is not None and side in self.channel:
            logger.info("proxy: connection %d: back-end request channel closed: %s", self.id, why)
            self._flush_quietly(side.peer)
            self._drop_channel()
            return False
        return True

    @staticmethod
    def _flush_quietly(side: LinkSide) -> None:
        try:
            side.flush()
        except LinkClosed:
            pass

    def close(self) -> None:
        """Pass on what is queued if the socket takes it now, then close
        every socket and fd of the connection."""
        if self.closed:
            return
        self.closed = True
        for side in self.sides:
            if not side.closed:
                self._flush_quietly(side)
        for side in self.sides:
            side.close()
        for n in self.notifiers.values():
            self.proxy.unwatch_fd(n.read_fd)
            n.close()
        self.state.close()


def _peer_alive(sock: socket.socket) -> bool:
    """False when the peer of connected ``sock`` hung up (EOF or an error
    pending); reads nothing (MSG_PEEK)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def _side_label(side: LinkSide) -> str:
    return {"front-end": "front-end", "back-end": "back-end", "backend-req": "back-end request",
            "backend-req-reply": "back-end request reply"}[side.direction]


class VhostUserProxy(SocketLoop):
    """Listen on ``listen_path`` for front-ends and relay each to a new
    connection to the back-end at ``connect_path``.

    ``introspect_path``: where to serve introspection (None: not served);
    ``introspect_any_uid``: serve readers of any uid. ``connections`` lists
    the live :class:`ProxyConnection`\\ s. Use :meth:`start` (a daemon
    thread) or :meth:`serve_forever`, and :meth:`stop` (from any thread or a
    signal handler): it closes every connection and removes the sockets.
    """

    LOG_NAME = "proxy"
    THREAD_NAME = "vhost-user-proxy"
    logger = logger

    def __init__(self, listen_path: str, connect_path: str, introspect_path: str | None = None, *,
                 introspect_any_uid: bool = False, device_type: str | None = None,
                 count_notifications: bool = False):
        super().__init__(listen_path, introspect_path, introspect_any_uid=introspect_any_uid)
        self.connect_path = connect_path
        self.device_type = device_type
        self.count_notifications = count_notifications
        self.connections: list[ProxyConnection] = []
        self.accepted = 0
        self.refused = 0
        self._next_id = 0
        self._masks: dict[LinkSide, int] = {}
        # Relayed kicks and calls (--count-notifications), numbered for the
        # events op as serve numbers its own (inspector/introspect/buffer.py).
        self.events = EventBuffer(EVENT_BUFFER if count_notifications else 1024)
        self._next_drain = 0.0
        # The back-end gate (see _backend_lost): while the back-end is down
        # the proxy does not listen; ``_spare`` is the back-end connection
        # made when it came back, kept for the next front-end.
        self._seen_device_type: str | None = None
        self.backend_down = False
        self._spare: socket.socket | None = None
        self._next_probe = 0.0

    def device_type_of(self, state: ConnectionState) -> str | None:
        """The VIRTIO device type of a connection: ``--device-type``, else
        what its messages say (ConnectionState.device_type), else what an
        earlier connection's said: the back-end behind ``connect_path`` is
        one device, and a front-end that reconnects (QEMU's vhost-user-blk
        after a back-end restart) does not ask GET_CONFIG again, and
        virtio-blk's and virtio-net's feature bits overlap."""
        dtype = self.device_type or state.device_type()
        if dtype is not None:
            self._seen_device_type = dtype
        return dtype or self._seen_device_type

    @property
    def listen_path(self) -> str:
        """The socket front-ends connect to (``socket_path``)."""
        return self.socket_path

    def open(self) -> None:
        """Create the sockets (done by start() / serve_forever() if needed)."""
        if self._sel is None:
            super().open()
            logger.info("proxy: listening on %s, back-end %s", self.listen_path, self.connect_path)

    # --- loop (inspector/vhost_user/loop.py runs it) ------------------------------------
    def _timers(self) -> float:
        now = time.monotonic()
        wait = 1.0
        if self.backend_down or self._spare is not None:
            if now >= self._next_probe:
                self._probe_backend()
                self._next_probe = now + BACKEND_PROBE_S
            wait = min(wait, max(0.0, self._next_probe - now))
        if self.count_notifications:
            if now >= self._next_drain:
                self.drain_events()
                self._next_drain = now + EVENT_POLL_S
            wait = min(wait, max(0.0, self._next_drain - now))
        return wait

    # --- the back-end gate ----------------------------------------------------------------
    # A front-end that connects while the back-end is down must see what it
    # would see without the proxy: a refused connect, not an accepted
    # connection that is closed at once (QEMU 7.2's vhost-user-blk takes the
    # latter as a failed vhost_dev_init and its reconnected device then
    # never completes I/O again). So when the back-end hangs up or refuses,
    # the proxy stops listening (the socket file stays: ECONNREFUSED) and
    # tries to connect to the back-end every BACKEND_PROBE_S (a refused
    # connect touches nothing); the connection that succeeds is kept for
    # the next front-end, and the proxy listens again. The back-end thus
    # sees the next front-end's connection a little early, and nothing else.
    def _backend_lost(self) -> None:
        """The back-end hung up on a connection or refused one: find out
        now whether it is still there (see above)."""
        self._next_probe = 0.0
        self._probe_backend()
        self._next_probe = time.monotonic() + BACKEND_PROBE_S

    def _probe_backend(self) -> None:
        if self._spare is not None:
            if _peer_alive(self._spare):
                return
            self._spare.close()
            self._spare = None
        try:
            back = self._connect_backend()
        except OSError as e:
            if not self.backend_down:
                self.backend_down = True
                self.pause_listening()
                logger.warning("proxy: back-end %s is down (%s): not listening on %s until it is back, so "
                               "front-ends are refused as they would be by the back-end itself",
                               self.connect_path, e.strerror or e, self.listen_path)
            return
        back.setblocking(False)    # (with a timeout, even a MSG_DONTWAIT peek waits for data)
        self._spare = back
        if self.backend_down:
            self.backend_down = False
            try:
                self.resume_listening()
            except InspectorError as e:
                logger.error("proxy: back-end %s is back, but listening on %s again failed: %s",
                             self.connect_path, self.listen_path, e)
                return
            logger.info("proxy: back-end %s is back: listening on %s again", self.connect_path, self.listen_path)

    def _connect_backend(self) -> socket.socket:
        """A new connection to the back-end (OSError when it refuses, is
        missing, or does not accept within CONNECT_TIMEOUT_S)."""
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.settimeout(CONNECT_TIMEOUT_S)
        try:
            back.connect(self.connect_path)
        except OSError:
            back.close()
            raise
        return back

    def _take_spare(self) -> socket.socket | None:
        spare, self._spare = self._spare, None
        if spare is not None and not _peer_alive(spare):
            spare.close()
            return None
        return spare

    def _handle(self, kind: str, obj, events: int) -> None:
        if kind == "notify":
            obj.relay()
        elif kind == "side":
            self._service(obj, events)

    def _failed(self, kind: str, obj) -> None:
        if kind == "side":
            self._close(obj[0], "proxy error (see the traceback above)")
        elif kind == "notify":
            self.unwatch_fd(obj.read_fd)

    def _close_all(self) -> None:
        for conn in list(self.connections):
            self._close(conn, "proxy stopping")
        if self._spare is not None:
            self._spare.close()
            self._spare = None

    def _accept(self, front: socket.socket) -> None:
        self._next_id += 1
        conn_id = self._next_id
        back = self._take_spare()
        if back is None:
            try:
                back = self._connect_backend()
            except OSError as e:
                front.close()
                self.refused += 1
                logger.warning("proxy: connection %d: front-end connected, back-end %s: cannot connect: %s; "
                               "closed the front-end's connection", conn_id, self.connect_path,
                               e.strerror or e)
                self._backend_lost()
                return
        conn = ProxyConnection(conn_id, front, back, self)
        self.accepted += 1
        with self._lock:
            self.connections.append(conn)
        for side in conn.sides:
            self.watch(conn, side)
        logger.info("proxy: connection %d: front-end connected, back-end connected", conn_id)

    def watch_fd(self, conn: ProxyConnection, notifier: Notifier) -> None:
        """Relay ``notifier`` whenever its fd is readable."""
        self._sel.register(notifier.read_fd, selectors.EVENT_READ, ("notify", notifier))

    def unwatch_fd(self, fd: int) -> None:
        try:
            if self._sel is not None:
                self._sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def watch(self, conn: ProxyConnection, side: LinkSide) -> None:
        """Register ``side`` in the loop (reads; writes when it has output)."""
        self._masks[side] = 0
        side.owner = conn
        self._update(side)

    def unwatch(self, side: LinkSide) -> None:
        if self._masks.pop(side, 0) and self._sel is not None:
            try:
                self._sel.unregister(side.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _update(self, side: LinkSide) -> None:
        """Set the events the loop waits for on ``side``: readable unless its
        peer's outbox is full, writable while its own outbox holds data."""
        if side not in self._masks or side.closed:
            return
        want = (0 if side.throttled else selectors.EVENT_READ) | (selectors.EVENT_WRITE if side.wants_write else 0)
        have = self._masks[side]
        if want == have:
            return
        if have == 0:
            self._sel.register(side.sock, want, ("side", (side.owner, side)))
        elif want == 0:
            self._sel.unregister(side.sock)
        else:
            self._sel.modify(side.sock, want, ("side", (side.owner, side)))
        self._masks[side] = want

    def _service(self, obj, events: int) -> None:
        conn, side = obj
        if conn.closed or side.closed:
            return
        try:
            if events & selectors.EVENT_WRITE:
                side.flush()
            if events & selectors.EVENT_READ:
                side.read()
                side.peer.flush()
        except LinkClosed as e:
            if conn.side_closed(e.side, e.why):
                self._close(conn, e.why)
                if e.side is conn.back:
                    self._backend_lost()
                return
        for s in conn.sides:
            self._update(s)

    def _close(self, conn: ProxyConnection, why: str) -> None:
        logger.info("proxy: connection %d closed: %s", conn.id, why)
        self._drain(conn)
        for side in conn.sides:
            self.unwatch(side)
        with self._lock:
            if conn in self.connections:
                self.connections.remove(conn)
            self.closed_logs.append((conn.id, list(conn.log)))
        conn.close()

    # --- introspection (inspector/introspect/server.py IntrospectionBackend) ------------
    def stamp(self, entry: dict, log: collections.deque) -> None:
        """Give a new message-log entry its proxy-wide ``seq`` and append it
        to ``log`` (under the lock :meth:`message_log` reads with)."""
        with self._lock:
            entry["seq"] = self._msg_seq
            self._msg_seq += 1
            log.append(entry)

    def introspection_snapshot(self, chains: bool = True) -> dict:
        """The Snapshot JSON of every proxied connection (without chains
        when ``chains`` is False)."""
        return to_json(proxy_snapshot(self), chains)

    def read_events(self, since: int, limit: int, binary: bool):
        """:meth:`EventBuffer.read` of the relayed kicks and calls."""
        return self.events.read(since, limit, binary=binary)

    def drain_events(self) -> None:
        """Move the relays' new event records into :attr:`events` (the loop
        does every EVENT_POLL_S with --count-notifications, and the
        introspection server before each reply)."""
        for conn in list(self.connections):
            self._drain(conn)

    def _drain(self, conn: ProxyConnection) -> None:
        for index, records in conn.drain_notifications():
            self.events.add(f"proxy{conn.id}", index, records)

