"""The queue screen's blk panel: a block queue's back-end counters
(``extras["blk"]``, README "Block queues in the inspector")."""

from __future__ import annotations

from textual.widgets import Static

from inspector.snapshot.model import QueueEntry

from ..render import labeled
from ..render_blk import blk_rows, blk_stats


class BlkPanel(Static):
    """Requests by type, statuses, bad requests by kind (non-zero ones
    highlighted), in flight, resubmitted, bytes and the recent completions
    with their status; hidden for a queue without blk counters. Updated
    only when its text changed."""

    _shown: tuple[str, ...] | None = None

    def show(self, queue: QueueEntry | None) -> None:
        blk = blk_stats(queue)
        self.display = blk is not None
        if blk is None:
            self._shown = None
            return
        rows = blk_rows(blk)
        key = tuple(f"{label}\0{text}" for label, text in rows)
        if key != self._shown:
            self._shown = key
            self.update(labeled(rows))
