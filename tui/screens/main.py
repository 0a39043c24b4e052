"""The main screen: status line, the table of every queue, and the problems."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer

from inspector.snapshot.model import QueueEntry

from ..widgets.problem_list import ProblemList
from ..widgets.queue_table import QueueTable
from ..widgets.status_header import StatusHeader
from .live import LiveScreen
from .queue import QueueScreen


class MainScreen(LiveScreen):
    """Every queue of the source, problems first (``s``: device order), and
    below the table one line per problem; enter opens the queue under the
    cursor."""

    BINDINGS = [Binding("s", "toggle_order", "Sort")]

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield from self.verdict_timeline()
        yield QueueTable(id="queues")
        yield ProblemList(id="problems")
        yield from self.replay_bar()
        yield Footer()

    def show_queues(self, queues: list[QueueEntry]) -> None:
        # The app sets ``rates`` and ``diagnoses`` before ``snapshot``: they belong together.
        app = self.app
        now = app.snapshot.time if app.snapshot is not None else None
        self.query_one(QueueTable).show(queues, app.rates, app.diagnoses, now)
        self.query_one(ProblemList).show(app.diagnoses, [q.id for q in queues])

    def action_toggle_order(self) -> None:
        first = self.query_one(QueueTable).toggle_order()
        self.notify("problems first" if first else "device order", timeout=2)
        if self.app.snapshot is not None:
            self.show_queues(self.app.snapshot.queues)

    def on_queue_table_selected(self, event: QueueTable.Selected) -> None:
        self.app.push_screen(QueueScreen(*event.queue))
