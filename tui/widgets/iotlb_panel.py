"""The queue screen's IOTLB panel: a queue behind an IOMMU
(``extras["iotlb"]``, README "IOVA-addressed rings")."""

from __future__ import annotations

from rich.text import Text

from inspector.snapshot.model import QueueEntry

from ..render_iotlb import iotlb_rows, iotlb_stats
from .rows_panel import RowsPanel


class IotlbPanel(RowsPanel):
    """The ring areas' IOVAs and translations, the IOTLB's counters and the
    miss the device waits for; hidden for a queue with guest-physical
    addresses."""

    def rows(self, queue: QueueEntry | None) -> list[tuple[str, Text | str]] | None:
        io = iotlb_stats(queue)
        return None if io is None else iotlb_rows(io)
