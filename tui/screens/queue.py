"""One queue: its fields, in-flight chains and anomalies, live."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Static

from inspector.snapshot.model import QueueEntry

from ..widgets.anomaly_table import AnomalyTable
from ..widgets.chain_table import ChainTable
from ..widgets.queue_fields import QueueFields
from ..widgets.status_header import StatusHeader
from .live import LiveScreen


class QueueScreen(LiveScreen):
    """Follows queue ``index`` of ``device`` through every new snapshot."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, device: str, index: int) -> None:
        super().__init__()
        self.queue = (device, index)

    def compose(self) -> ComposeResult:
        device, index = self.queue
        yield StatusHeader()
        yield Static(f"{device} queue {index}", classes="title")
        yield QueueFields()
        yield Static("in-flight chains (made available, not yet taken by the device)", classes="section")
        yield ChainTable(id="chains")
        yield Static("anomalies", classes="section")
        yield AnomalyTable(id="anomalies")
        yield from self.replay_bar()
        yield Footer()

    def show_queues(self, queues: list[QueueEntry]) -> None:
        queue = next((q for q in queues if q.id == self.queue), None)
        self.query_one(QueueFields).show(queue)
        self.query_one(ChainTable).show(queue.chains if queue else [])
        self.query_one(AnomalyTable).show(queue.anomalies if queue else [])
