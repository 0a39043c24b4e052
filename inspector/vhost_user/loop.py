"""The event loop both vhost-user servers share: ``vqscope serve``'s
(inspector/vhost_user/server.py) and ``vqscope proxy``'s
(inspector/vhost_user/proxy.py).

One thread, ``selectors``: the listening vhost-user socket, the
introspection socket and its readers (inspector/introspect/server.py), a
wake-up socket pair for :meth:`SocketLoop.stop` (safe from any thread and
from signal handlers), and whatever the subclass registers with its own
``(kind, obj)`` data. Both sockets are created mode 0600 and appear only
once listening (introspect.server.listen_unix); both are removed at the end.

A subclass gives :meth:`~SocketLoop._accept` (a front-end connected),
:meth:`~SocketLoop._handle` (an event of one of its own kinds),
:meth:`~SocketLoop._failed` (that handler raised), :meth:`~SocketLoop._close_all`
(the loop is ending) and, optionally, :meth:`~SocketLoop._timers` (periodic
work; returns the select timeout). It also answers what the introspection
server reads (introspect.server.IntrospectionBackend); the message log of
live and recently closed connections is kept here.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import threading
import time

from ..introspect.server import IntrospectionServer, close_listener, listen_unix

_CLOSED_LOGS_KEPT = 16


class SocketLoop:
    """Listen on ``socket_path`` and serve introspection on
    ``introspect_path`` (None: not served; ``introspect_any_uid``: readers
    of any uid) from one selector loop: :meth:`start` runs it in a daemon
    thread, :meth:`serve_forever` in this one, :meth:`stop` ends it.

    ``connections``: the live connections (each with ``id`` and ``log``, a
    deque of message-log dicts numbered with ``seq``); ``closed_logs``: the
    logs of the last closed ones. ``instance`` names this process's server
    in ``events`` and ``messages`` replies.
    """

    #: The log line prefix and logger of the subclass; its thread's name.
    LOG_NAME = "server"
    THREAD_NAME = "socket-loop"
    logger = logging.getLogger("inspector.vhost_user")

    def __init__(self, socket_path: str, introspect_path: str | None = None, *, introspect_any_uid: bool = False):
        self.socket_path = socket_path
        self.introspect_path = introspect_path
        self.introspect_any_uid = introspect_any_uid
        self.connections: list = []
        self.closed_logs: collections.deque[tuple[int, list[dict]]] = collections.deque(
            maxlen=_CLOSED_LOGS_KEPT)
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._msg_seq = 0
        # Names this server among others on the same path (a restarted
        # server starts its sequence numbers at 0 again): every events and
        # messages reply carries it, and a client whose instance changed
        # reads from 0 (inspector/introspect/__init__.py).
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.introspection = IntrospectionServer(introspect_path, self, any_uid=introspect_any_uid)

    # --- lifecycle -----------------------------------------------------------------
    def open(self) -> None:
        """Create the sockets (done by start() / serve_forever() if needed)."""
        if self._sel is not None:
            return
        self._listener = listen_unix(self.socket_path)
        try:
            ilistener = self.introspection.open()
        except BaseException:
            self._listener = close_listener(self._listener, self.socket_path)
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        if ilistener is not None:
            self._sel.register(ilistener, selectors.EVENT_READ, ("ilisten", None))
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stopping = False

    def start(self):
        """Listen now and run the loop in a daemon thread; returns self."""
        self.open()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def listening(self) -> bool:
        """True while front-ends can connect (see :meth:`pause_listening`)."""
        return self._listener is not None

    def pause_listening(self) -> None:
        """Stop accepting front-ends: the listening socket is closed but its
        file stays, so a front-end's connect() gets ECONNREFUSED, as from a
        server that is not running (QEMU's ``reconnect`` retries then)."""
        if self._listener is None:
            return
        if self._sel is not None:
            try:
                self._sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
        self._listener.close()
        self._listener = None

    def resume_listening(self) -> None:
        """Listen again after :meth:`pause_listening` (the stale file is
        replaced: introspect.server.listen_unix)."""
        if self._listener is not None or self._sel is None:
            return
        self._listener = listen_unix(self.socket_path)
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))

    # --- loop ----------------------------------------------------------------------
    def _run(self) -> None:
        sel = self._sel
        try:
            while not self._stopping:
                for key, events in sel.select(timeout=self._timers()):
                    kind, obj = key.data
                    try:
                        if kind == "listen":
                            self._take_front_end()
                        elif kind == "ilisten":
                            self.introspection.accept(sel)
                        elif kind == "iclient":
                            self.introspection.service(sel, obj, events)
                        elif kind == "wake":
                            try:
                                self._wake_r.recv(64)
                            except OSError:
                                pass
                        else:
                            self._handle(kind, obj, events)
                    except Exception:
                        self.logger.exception("%s: unexpected error handling %s", self.LOG_NAME, kind)
                        if kind == "iclient":
                            self.introspection.close_reader(sel, obj)
                        else:
                            self._failed(kind, obj)
                    if self._stopping:
                        break
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._close_all()
        sel, self._sel = self._sel, None
        if sel is not None:
            for key in list(sel.get_map().values()):
                kind, obj = key.data
                if kind == "iclient":
                    obj.sock.close()
            sel.close()
        if self._listener is None:           # paused: its file is still there
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self._listener = close_listener(self._listener, self.socket_path)
        self.introspection.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    def _take_front_end(self) -> None:
        """Accept a waiting front-end and hand it to :meth:`_accept`; a
        failing accept (EMFILE etc.) is logged and the loop goes on."""
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.logger.warning("%s: accept failed: %s", self.LOG_NAME, e)
            return
        self._accept(sock)

    # --- what a subclass gives -------------------------------------------------------
    def _timers(self) -> float:
        """Periodic work; the seconds the loop may sleep until the next."""
        return 1.0

    def _accept(self, sock: socket.socket) -> None:
        """A front-end connected on ``sock`` (now the subclass's)."""
        raise NotImplementedError

    def _handle(self, kind: str, obj, events: int) -> None:
        raise NotImplementedError

    def _failed(self, kind: str, obj) -> None:
        """:meth:`_handle` raised for ``obj``: close what it belongs to."""

    def _close_all(self) -> None:
        """Close every connection (the loop is ending)."""

    # --- messages --------------------------------------------------------------------
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
