"""The main screen: status line and the table of every queue."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Footer

from inspector.snapshot.model import QueueEntry

from ..widgets.queue_table import QueueTable
from ..widgets.status_header import StatusHeader
from .live import LiveScreen
from .queue import QueueScreen


class MainScreen(LiveScreen):
    """Every queue of the source; enter opens the queue under the cursor."""

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield QueueTable(id="queues")
        yield from self.replay_bar()
        yield Footer()

    def show_queues(self, queues: list[QueueEntry]) -> None:
        # The app sets ``rates`` before ``snapshot``: they belong together.
        self.query_one(QueueTable).show(queues, self.app.rates)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        device, index = self.query_one(QueueTable).queue_at(event.row_key.value)
        self.app.push_screen(QueueScreen(device, index))
