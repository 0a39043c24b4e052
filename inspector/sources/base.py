"""The base class of every source of queue state."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..events import Event
from ..snapshot.model import Snapshot


class Source(ABC):
    """Something that can be asked for the current snapshot, repeatedly
    (the TUI polls it from a worker thread, the recorder every interval).

    Subclasses set ``name`` (what the TUI's status line and the recording's
    header name) and implement :meth:`snapshot`; the other methods have
    defaults for a source without events or messages. ``has_events`` /
    ``has_messages`` say whether :meth:`events` / :meth:`new_messages` can
    return anything (a recording's header records them). A source is a
    context manager that closes itself.
    """

    name: str = ""
    has_events: bool = False
    has_messages: bool = False

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """The snapshot now (inspector.snapshot.model). Raises SourceError
        when the source cannot be read, SourceGone when it went away."""

    def events(self) -> list[Event]:
        """The timed events (kicks, calls, probe hits; inspector/events.py)
        seen since the previous call, oldest first, never the same event
        twice. Default: none."""
        return []

    def events_lost(self) -> int:
        """Events the source could not deliver since it was opened (ring
        full, perf buffer overrun), cumulative. Default: 0."""
        return 0

    def new_messages(self) -> list[dict]:
        """vhost-user messages logged since the previous call (the entries
        of the introspection ``messages`` op: ``time``, ``request``,
        ``fields`` ...), oldest first. Default: none."""
        return []

    def close(self) -> None:
        """Release what the source holds (sockets, probes, file handles);
        idempotent. Default: nothing."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
