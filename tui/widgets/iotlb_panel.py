"""The queue screen's IOTLB panel: a queue behind an IOMMU
(``extras["iotlb"]``, README "IOVA-addressed rings")."""

from __future__ import annotations

from textual.widgets import Static

from inspector.snapshot.model import QueueEntry

from ..render import labeled
from ..render_iotlb import iotlb_rows, iotlb_stats


class IotlbPanel(Static):
    """The ring areas' IOVAs and translations, the IOTLB's counters and the
    miss the device waits for; hidden for a queue with guest-physical
    addresses. Updated only when its text changed."""

    _shown: tuple[str, ...] | None = None

    def show(self, queue: QueueEntry | None) -> None:
        io = iotlb_stats(queue)
        self.display = io is not None
        if io is None:
            self._shown = None
            return
        rows = iotlb_rows(io)
        key = tuple(f"{label}\0{text}" for label, text in rows)
        if key != self._shown:
            self._shown = key
            self.update(labeled(rows))
