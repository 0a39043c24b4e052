"""The queue screen's blk panel: a block queue's back-end counters
(``extras["blk"]``, README "Block queues in the inspector")."""

from __future__ import annotations

from rich.text import Text

from inspector.snapshot.model import QueueEntry

from ..render_blk import blk_rows, blk_stats
from .rows_panel import RowsPanel


class BlkPanel(RowsPanel):
    """Requests by type, statuses, bad requests by kind (non-zero ones
    highlighted), in flight, resubmitted, bytes and the recent completions
    with their status; hidden for a queue without blk counters."""

    def rows(self, queue: QueueEntry | None) -> list[tuple[str, Text | str]] | None:
        blk = blk_stats(queue)
        return None if blk is None else blk_rows(blk)
