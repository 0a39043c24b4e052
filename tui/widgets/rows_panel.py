"""A queue-screen panel of labeled rows that a queue may or may not have
(the blk counters, the IOTLB): hidden when it has none, updated only when
its text changed (each update lays the screen out)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.snapshot.model import QueueEntry

from ..render import labeled


class RowsPanel(Static):
    """Subclasses give :meth:`rows`: the queue's ``(label, content)`` rows,
    or None when the panel does not apply to it."""

    _shown: tuple[str, ...] | None = None

    def rows(self, queue: QueueEntry | None) -> list[tuple[str, Text | str]] | None:
        raise NotImplementedError

    def show(self, queue: QueueEntry | None) -> None:
        rows = self.rows(queue)
        self.display = rows is not None
        if rows is None:
            self._shown = None
            return
        key = tuple(f"{label}\0{text}" for label, text in rows)
        if key != self._shown:
            self._shown = key
            self.update(labeled(rows))
