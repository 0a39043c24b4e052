"""Every scalar field of one queue, as a grid of spec names and values."""

from __future__ import annotations

from textual.widgets import Static

from inspector.snapshot.model import QueueEntry

from ..render import fields_grid, queue_fields


class QueueFields(Static):
    """The queue screen's grid of fields; ``show(None)`` when the queue is
    gone. The screen is laid out again only when a value's width changed."""

    _widths: list[int] | None = None

    def show(self, queue: QueueEntry | None) -> None:
        if queue is None:
            self._widths = None
            self.update("this queue is not in the latest snapshot")
            return
        widths = [len(value) for _, value in queue_fields(queue)]
        self.update(fields_grid(queue, pairs_per_row=5), layout=widths != self._widths)
        self._widths = widths
