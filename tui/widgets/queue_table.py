"""The table of every queue of a snapshot, one row per queue, updated in place."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from inspector.snapshot.model import QueueEntry, QueueId

from ..rates import NO_RATES, QueueRates
from ..render import ANOMALY_COLUMN, QUEUE_COLUMNS, RATE_COLUMNS, TEXT_COLUMNS, queue_cells, rate_cells

COLUMNS = QUEUE_COLUMNS + RATE_COLUMNS + (ANOMALY_COLUMN,)


class QueueTable(DataTable):
    """Rows keyed by queue; a new snapshot rewrites only the cells that changed,
    so the cursor and the scroll position stay where the user left them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._ids: dict[str, QueueId] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(self._justify(key, label), key=key)

    def queue_at(self, row_key: str) -> QueueId:
        """The (device, index) of the row with ``row_key``."""
        return self._ids[row_key]

    def show(self, queues: list[QueueEntry], rates: dict[QueueId, QueueRates]) -> None:
        """Bring the rows to ``queues``: update cells, add and drop rows."""
        seen = set()
        for q in queues:
            qid = q.id
            key = f"{qid[0]}#{qid[1]}"
            seen.add(key)
            cells = queue_cells(q) | rate_cells(rates.get(qid, NO_RATES))
            if key not in self._ids:
                self._ids[key] = qid
                self.add_row(*(self._justify(k, cells[k]) for k, _ in COLUMNS), key=key)
                continue
            for k, _ in COLUMNS:
                value = self._justify(k, cells[k])
                if self.get_cell(key, k) != value:
                    self.update_cell(key, k, value, update_width=True)
        for key in set(self._ids) - seen:
            self.remove_row(key)
            del self._ids[key]

    @staticmethod
    def _justify(key: str, value: str | Text) -> str | Text:
        """Numbers right-aligned (a Text with justify), text left-aligned."""
        if key in TEXT_COLUMNS:
            return value
        if isinstance(value, Text):
            value.justify = "right"
            return value
        return Text(value, justify="right")
