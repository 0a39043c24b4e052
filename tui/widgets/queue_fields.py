"""Every scalar field of one queue, as a grid of spec names and values."""

from __future__ import annotations

from textual.widgets import Static

from inspector.snapshot.model import QueueEntry

from ..render import fields_grid


class QueueFields(Static):
    """The queue screen's top block; ``show(None)`` when the queue is gone."""

    def show(self, queue: QueueEntry | None) -> None:
        self.update("this queue is not in the latest snapshot" if queue is None else fields_grid(queue))
