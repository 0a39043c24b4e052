"""The server side of the introspection protocol (described in
inspector/introspect/__init__.py): the listening socket, per-reader
connections with bounded buffers, request parsing and the three read-only
ops.

It has no loop of its own: the owner (inspector/vhost_user/server.py)
registers :attr:`IntrospectionServer.listener` in its selector and calls
:meth:`~IntrospectionServer.accept` and :meth:`~IntrospectionServer.service`
when the sockets are ready. Sockets are non-blocking and buffers bounded, so
a slow or silent reader never holds the owner's loop. What the ops return
comes from the owner (an :class:`IntrospectionBackend`): the snapshot, the
message log and the event buffer.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import selectors
import socket
import stat
import struct
from typing import Protocol

from ..errors import InspectorError
from .buffer import EVENTS_PER_REPLY

_TMP_SEQ = itertools.count()

#: Every introspection operation; each only reads. Anything else is refused.
INTROSPECT_OPS = ("snapshot", "messages", "events")

MAX_REQUEST_LINE = 64 * 1024
MAX_PENDING_OUT = 64 * 1024 * 1024

logger = logging.getLogger("inspector.vhost_user")


def listen_unix(path: str) -> socket.socket:
    """A listening, non-blocking Unix stream socket at ``path``, mode 0600
    (chmod between bind and listen: no one can connect before listen, so
    there is no window); the file appears at ``path`` only once it listens.
    A stale socket file (nobody listening) is removed; a live one or a
    non-socket file is an InspectorError."""
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
    # Bound and listening under a temporary name beside it, then renamed
    # into place: the path appears only once connect() can succeed, so a
    # peer that waits for the file (QEMU, a script, a test) never sees
    # ECONNREFUSED from a socket that is not listening yet.
    tmp = os.path.join(os.path.dirname(path) or ".", f".vqs-{os.getpid()}-{next(_TMP_SEQ)}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.bind(tmp)
        except OSError:      # the temporary name too long for sun_path, say: bind in place
            tmp = path
            s.bind(path)
        os.chmod(tmp, 0o600)
        s.listen(16)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as e:
        s.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise InspectorError(f"cannot listen on {path}: {e.strerror}") from e
    s.setblocking(False)
    return s


def close_listener(sock: socket.socket | None, path: str | None) -> None:
    """Close a :func:`listen_unix` socket (if any) and remove its file;
    always returns None (for ``s = close_listener(s, path)``)."""
    if sock is not None:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    return None


def parse_request(line: bytes | str) -> tuple[str, dict] | dict:
    """``(op, request)`` of one request line, or the ``{"error": ...}``
    reply it gets (not JSON, too deeply nested, unknown op, or a ``since``,
    ``limit`` or ``binary`` that is not what the protocol says)."""
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
    if op == "events":
        limit = req.get("limit", EVENTS_PER_REPLY)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return {"error": f"events: limit {limit!r} is invalid: give a positive integer"}
        if not isinstance(req.get("binary", False), bool):
            return {"error": f"events: binary {req['binary']!r} is invalid: give true or false"}
    if op == "snapshot" and not isinstance(req.get("chains", True), bool):
        return {"error": f"snapshot: chains {req['chains']!r} is invalid: give true or false"}
    return op, req


def encode_reply(reply: dict | tuple[dict, bytes]) -> bytes:
    """The bytes of one reply: a JSON line, followed for a binary ``events``
    reply by its records."""
    if isinstance(reply, tuple):
        header, payload = reply
        return json.dumps(header).encode() + b"\n" + payload
    return json.dumps(reply).encode() + b"\n"


class ReaderConnection:
    """One reader's connection: its socket, the partial request line read
    so far and the reply bytes not sent yet."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class IntrospectionBackend(Protocol):
    """What an :class:`IntrospectionServer` reads (the vhost-user server,
    inspector/vhost_user/server.py, is one)."""

    #: This server's name in ``events`` and ``messages`` replies: it changes
    #: when the back-end restarts (its sequence numbers start again at 0).
    instance: str

    def introspection_snapshot(self, chains: bool = True) -> dict:
        """The snapshot JSON object (README.md, "Snapshot JSON"); without
        the chains (``codec.to_json``'s ``chains``) when ``chains`` is False."""

    def message_log(self, since: int | None) -> tuple[list[dict], int]:
        """The message log entries with ``seq >= since`` (None: all), and
        the ``next`` cursor."""

    def read_events(self, since: int, limit: int, binary: bool) -> dict | tuple[dict, bytes]:
        """The event buffer's reply (:meth:`.buffer.EventBuffer.read`)."""

    def drain_events(self) -> None:
        """Bring the event buffer up to date (called before each reply)."""


class IntrospectionServer:
    """Serve the introspection protocol at ``path`` (None: no socket; the
    ops still answer through :meth:`answer`) from ``backend``.
    ``any_uid``: serve readers of any uid (default: this process's uid and
    root only; ``refused_readers`` counts the others).
    """

    def __init__(self, path: str | None, backend: IntrospectionBackend, any_uid: bool = False):
        self.path = path
        self.backend = backend
        self.any_uid = any_uid
        self.refused_readers = 0
        self.listener: socket.socket | None = None

    # --- sockets ----------------------------------------------------------------
    def open(self) -> socket.socket | None:
        """Listen at ``path`` (see :func:`listen_unix`); the listener, or None without a path."""
        if self.path and self.listener is None:
            self.listener = listen_unix(self.path)
        return self.listener

    def accept(self, sel: selectors.BaseSelector) -> None:
        """Accept a reader (its uid checked with SO_PEERCRED) and register
        its ReaderConnection in ``sel`` with data ``("iclient", conn)``."""
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        if not self.any_uid:
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
        conn = ReaderConnection(sock)
        sel.register(sock, selectors.EVENT_READ, ("iclient", conn))

    def close_reader(self, sel: selectors.BaseSelector | None, conn: ReaderConnection) -> None:
        try:
            if sel is not None:
                sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()

    def service(self, sel: selectors.BaseSelector, conn: ReaderConnection, events: int) -> None:
        """Read what the reader sent, answer each complete line, send what
        the socket takes; a reader that closed, failed or went past the
        bounds is closed."""
        if events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.close_reader(sel, conn)
                return
            if data:
                conn.inbuf += data
                while b"\n" in conn.inbuf:
                    line, _, rest = bytes(conn.inbuf).partition(b"\n")
                    conn.inbuf = bytearray(rest)
                    if line.strip():
                        conn.outbuf += self.reply(line)
                if len(conn.inbuf) > MAX_REQUEST_LINE or len(conn.outbuf) > MAX_PENDING_OUT:
                    self.close_reader(sel, conn)
                    return
        if conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
                del conn.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close_reader(sel, conn)
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        sel.modify(conn.sock, want, ("iclient", conn))

    def close(self) -> None:
        """Close the listener and remove its socket file (the owner closes
        the readers registered in its selector)."""
        self.listener = close_listener(self.listener, self.path)

    # --- ops --------------------------------------------------------------------------
    def reply(self, line: bytes | str) -> bytes:
        """The bytes answering one request line (:func:`encode_reply` of :meth:`answer`)."""
        return encode_reply(self.answer(line))

    def answer(self, line: bytes | str) -> dict | tuple[dict, bytes]:
        """Answer one request line: the reply object, or for ``events`` with
        ``"binary": true`` the header and the records. Never raises for
        anything a reader sends."""
        parsed = parse_request(line)
        if isinstance(parsed, dict):
            return parsed
        op, req = parsed
        backend = self.backend
        backend.drain_events()
        instance = backend.instance
        if op == "events":
            limit = min(req.get("limit", EVENTS_PER_REPLY), EVENTS_PER_REPLY)
            reply = backend.read_events(req.get("since") or 0, limit, req.get("binary", False))
            if isinstance(reply, tuple):
                return {**reply[0], "instance": instance}, reply[1]
            return {**reply, "instance": instance}
        if op == "snapshot":
            try:
                return backend.introspection_snapshot(chains=req.get("chains", True))
            except Exception as e:
                logger.warning("introspection: snapshot failed: %s", e)
                return {"error": f"snapshot failed: {type(e).__name__}: {e}"}
        if op == "messages":
            msgs, next_seq = backend.message_log(req.get("since"))
            return {"messages": msgs, "next": next_seq, "instance": instance}
        raise AssertionError(f"op {op!r} is in INTROSPECT_OPS but not handled")
