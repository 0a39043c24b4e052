"""The client side of the introspection protocol (described in
inspector/introspect/__init__.py): one connection to a back-end's
introspection socket, requests and replies (the binary ``events`` form
included), and the reader's cursors over ``events`` and ``messages``.
"""

from __future__ import annotations

import json
import socket

from ..errors import SourceError
from ..events import EVENT_KIND_NAMES, EVENT_RECORD, Event

EVENTS_PER_REQUEST = 65536
MAX_BINARY = 16 * EVENTS_PER_REQUEST    # bytes of records one binary reply may carry


def decode_binary_events(records: bytes, chunks, where: str) -> list[Event]:
    """The Events of a binary ``events`` reply: its ``chunks`` ([[device,
    queue, n], ...]) over ``records`` (n packed EVENT_RECORDs each, chunk
    after chunk). SourceError naming ``where`` when they do not add up."""
    view = memoryview(records)
    out: list[Event] = []
    off = 0
    try:
        for device, queue, n in chunks:
            end = off + n * EVENT_RECORD.size
            if not (isinstance(n, int) and 0 < n and end <= len(view)):
                raise SourceError(f"back-end at {where} sent a malformed events reply: chunk of "
                                  f"{n!r} events at byte {off}")
            out += [Event(t, device, queue, EVENT_KIND_NAMES.get(k, "unknown"), v)
                    for t, k, v in EVENT_RECORD.iter_unpack(view[off:end])]
            off = end
        if off != len(view):
            raise SourceError(f"back-end at {where} sent a malformed events reply: "
                              f"{len(view) - off} bytes beyond the chunks")
    except (TypeError, ValueError) as e:   # a chunk that is not [device, queue, n]
        raise SourceError(f"back-end at {where} sent a malformed events reply: {e}") from e
    return out


class IntrospectionClient:
    """A reader of the introspection socket at ``path``; connects lazily
    (again after a failure). Raises SourceError when the back-end cannot be
    reached, closes the connection, answers ``{"error": ...}`` or sends a
    malformed reply.

    :meth:`events` and :meth:`new_messages` keep this reader's cursors
    (the ``next`` of the previous reply) and follow a back-end restart
    (another ``instance``) by reading the new one from 0.
    """

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile = None
        self._events_next = 0
        self._dropped_base: int | None = None
        self._dropped = 0
        self._gaps = 0
        self._dropped_carry = 0   # losses counted against back-end instances before this one
        self._messages_next = 0
        self._events_instance: str | None = None
        self._messages_instance: str | None = None

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise SourceError(f"cannot connect to the introspection socket {self.path}: {e.strerror}; "
                              f"is `vqscope serve` running?") from e
        self._sock = s
        self._rfile = s.makefile("rb")

    def request(self, op: str, **params) -> dict:
        """Send ``{"op": op, **params}`` and return the decoded reply (a
        binary reply with its bytes as ``"records"``)."""
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
            line = self._rfile.readline()
        except OSError as e:
            self.close()
            raise SourceError(f"introspection socket {self.path}: {e}") from e
        if not line:
            self.close()
            raise SourceError(f"back-end at {self.path} closed the introspection connection")
        try:
            reply = json.loads(line)
        except ValueError as e:
            self.close()
            raise SourceError(f"back-end at {self.path} sent a malformed reply: {e}") from e
        if "error" in reply:
            raise SourceError(f"back-end at {self.path}: {reply['error']}")
        if "binary" in reply:
            n = reply["binary"]
            data = self._rfile.read(n) if isinstance(n, int) and 0 <= n <= MAX_BINARY else None
            if data is None or len(data) != n:
                self.close()
                raise SourceError(f"back-end at {self.path} sent a malformed reply: binary {n!r}, "
                                  f"{'no' if data is None else len(data)} bytes")
            reply["records"] = data
        return reply

    def messages(self) -> list[dict]:
        """The whole message log the back-end keeps."""
        return self.request("messages")["messages"]

    def new_messages(self) -> list[dict]:
        """vhost-user messages logged since the previous call (the first
        call: all the back-end keeps), oldest first, each with its ``seq``."""
        reply = self.request("messages", since=self._messages_next)
        instance = reply.get("instance")
        if self._messages_instance is not None and instance != self._messages_instance:
            self._messages_next = 0     # a restarted back-end: its log from the start
            reply = self.request("messages", since=0)
            instance = reply.get("instance")
        self._messages_instance = instance
        self._messages_next = reply["next"]
        return reply["messages"]

    def events(self) -> list[Event]:
        """Timed events (kicks, calls; inspector/events.py) since the previous
        call, never the same twice; the first call returns what the back-end
        still buffers. Asks again while a reply comes back full. A back-end
        that restarted (another ``instance``) is read from its first event;
        its losses add to those of the earlier one."""
        out: list[Event] = []
        while True:
            reply = self.request("events", since=self._events_next, limit=EVENTS_PER_REQUEST,
                                 binary=True)
            instance = reply.get("instance")
            if self._events_instance is not None and instance != self._events_instance:
                # Events the old instance had not handed over are gone; this
                # one's sequence starts at 0 and all its losses happened
                # while this source watched.
                self._dropped_carry += self._dropped
                self._dropped_base, self._dropped, self._events_next = 0, 0, 0
                self._events_instance = instance
                continue
            self._events_instance = instance
            evs = self._decode_events(reply)
            out.extend(evs)
            if self._dropped_base is None:
                # Losses before this source opened are not ours, nor is the
                # part of the back-end's history it no longer buffers.
                self._dropped_base = reply["dropped"]
            else:
                self._gaps += reply["gap"]
            self._dropped = reply["dropped"] - self._dropped_base
            self._events_next = reply["next"]
            if len(evs) < EVENTS_PER_REQUEST:
                return out

    def _decode_events(self, reply: dict) -> list[Event]:
        if "records" not in reply:
            return [Event(*e) for e in reply["events"]]
        try:
            return decode_binary_events(reply["records"], reply.get("chunks"), self.path)
        except SourceError:
            self.close()
            raise

    def events_lost(self) -> int:
        """Events this reader could not deliver since it was opened: dropped
        by the back-end's full device logs plus those that left its buffer
        before :meth:`events` asked (cumulative)."""
        return self._dropped_carry + self._dropped + self._gaps

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._rfile.close()
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
