"""The main screen: status line and the table of every queue."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from ..widgets.queue_table import QueueTable
from ..widgets.status_header import StatusHeader


class MainScreen(Screen):
    """Every queue of the source; enter opens the queue under the cursor."""

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield QueueTable(id="queues")
        yield Footer()

    def on_mount(self) -> None:
        header = self.query_one(StatusHeader)
        header.source_name = self.app.source.name
        self.watch(self.app, "gone", self._show_gone)
        self.watch(self.app, "snapshot", self._show_snapshot)

    def _show_gone(self, gone: str | None) -> None:
        self.query_one(StatusHeader).gone = gone

    def _show_snapshot(self, snap: dict | None) -> None:
        if snap is None:
            return
        header = self.query_one(StatusHeader)
        header.snap_time, header.queue_count = snap["time"], len(snap["queues"])
        # The app sets ``rates`` before ``snapshot``: they belong together.
        self.query_one(QueueTable).show(snap["queues"], self.app.rates)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        from .queue import QueueScreen

        device, index = self.query_one(QueueTable).queue_at(event.row_key.value)
        self.app.push_screen(QueueScreen(device, index))
