"""A vqscope back-end as a source, through its read-only introspection socket.

Protocol (one Unix stream connection, newline-delimited JSON both ways): the
client sends ``{"op": "snapshot"}`` and receives one snapshot JSON object, or
``{"error": "..."}``. Other ops:

- ``{"op": "messages"}`` returns ``{"messages": [...], "next": M}``, the
  back-end's vhost-user message log, each entry with a server-wide ``seq``;
  ``{"op": "messages", "since": N}`` only the entries with ``seq >= N``.
- ``{"op": "events", "since": N}`` (optional ``"limit"``, at most 65536)
  returns ``{"next": M, "head": H, "dropped": D, "gap": G, "events": [[time_ns,
  device, queue, kind, value], ...]}``: the timed events (inspector/events.py)
  with sequence number >= N, oldest first within a queue. ``next`` is the
  cursor for the next call; ``head`` the number the next event will get;
  ``dropped`` the events the devices' logs lost (full)
  since the back-end started; ``gap`` the events >= N that left the
  back-end's bounded buffer before this call. With ``"binary": true`` the
  reply line has ``"chunks": [[device, queue, n], ...]`` and ``"binary": B``
  instead of ``events``, and B bytes of packed records follow it (16 bytes
  each: u64 time_ns, u32 kind code, u32 value; inspector.events.EVENT_RECORD
  and EVENT_KIND_NAMES), chunk after chunk: the server copies them instead
  of encoding each event (what :meth:`BackendSource.events` asks for).

Both ``events`` and ``messages`` replies carry ``instance``, a name of the
serving process that changes when the back-end restarts (its sequence
numbers start again at 0): a client holding cursors of an earlier instance
reads the new one from 0.

There is no operation that writes anything.
"""

from __future__ import annotations

import json
import os
import socket

from ..errors import SnapshotFormatError, SourceError
from ..events import EVENT_KIND_NAMES, EVENT_RECORD, Event
from ..snapshot.codec import from_json
from ..snapshot.model import Snapshot
from .base import Source

EVENTS_PER_REQUEST = 65536
MAX_BINARY = 16 * EVENTS_PER_REQUEST    # bytes of records one binary reply may carry


def introspect_path(path: str) -> str:
    """Map a back-end's vhost-user socket path to its introspection socket
    (``PATH.introspect``); an introspection path is returned as is."""
    if path.endswith(".introspect") or not os.path.exists(path + ".introspect"):
        return path
    return path + ".introspect"


class BackendSource(Source):
    """Client of a back-end's introspection endpoint; reconnects lazily."""

    has_events = True
    has_messages = True

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = introspect_path(path)
        self.name = self.path
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
        """Send ``{"op": op, **params}`` and return the decoded reply."""
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

    def snapshot(self) -> Snapshot:
        """The back-end's snapshot (its ``snapshot`` reply, parsed);
        SourceError when it does not answer or breaks the Snapshot JSON
        contract."""
        reply = self.request("snapshot")
        try:
            return from_json(reply)
        except SnapshotFormatError as e:
            raise SourceError(f"back-end at {self.path} sent a malformed snapshot: {e}") from None

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
            evs = self._binary_events(reply) if "records" in reply else [Event(*e) for e in reply["events"]]
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

    def _binary_events(self, reply: dict) -> list[Event]:
        """The Events of a binary ``events`` reply (its ``chunks`` and
        ``records``); SourceError when they do not add up."""
        records, chunks = memoryview(reply["records"]), reply.get("chunks")
        out: list[Event] = []
        off = 0
        try:
            for device, queue, n in chunks:
                end = off + n * EVENT_RECORD.size
                if not (isinstance(n, int) and 0 < n and end <= len(records)):
                    raise ValueError(f"chunk of {n!r} events at byte {off}")
                out += [Event(t, device, queue, EVENT_KIND_NAMES.get(k, "unknown"), v)
                        for t, k, v in EVENT_RECORD.iter_unpack(records[off:end])]
                off = end
            if off != len(records):
                raise ValueError(f"{len(records) - off} bytes beyond the chunks")
        except (TypeError, ValueError) as e:
            self.close()
            raise SourceError(f"back-end at {self.path} sent a malformed events reply: {e}") from e
        return out

    def events_lost(self) -> int:
        """Events this source could not deliver since it was opened: dropped
        by the back-end's full device logs plus those that left its buffer
        before :meth:`events` asked (cumulative)."""
        return self._dropped_carry + self._dropped + self._gaps

    def close(self) -> None:
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = None
