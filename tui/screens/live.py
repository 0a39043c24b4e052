"""Base for screens that follow the app's live (or replayed) snapshot."""

from __future__ import annotations

from textual.screen import Screen

from inspector.snapshot.model import QueueEntry, Snapshot

from ..widgets.replay_bar import ReplayBar
from ..widgets.status_header import StatusHeader


class LiveScreen(Screen):
    """Keeps the StatusHeader in step with the app (source name, gone,
    snapshot time and queue count) and calls :meth:`show_queues` with each
    new snapshot's queues."""

    def on_mount(self) -> None:
        header = self.query_one(StatusHeader)
        header.source_name, header.live = self.app.source.name, not self.app.replay
        self.watch(self.app, "gone", self._show_gone)
        self.watch(self.app, "snapshot", self._show_snapshot)

    def _show_gone(self, gone: str | None) -> None:
        self.query_one(StatusHeader).gone = gone

    def _show_snapshot(self, snap: Snapshot | None) -> None:
        if snap is None:
            return
        header = self.query_one(StatusHeader)
        header.snap_time, header.queue_count = snap.time, len(snap.queues)
        self.show_queues(snap.queues)

    def show_queues(self, queues: list[QueueEntry]) -> None:
        """Render the queues of a new snapshot (override)."""

    def replay_bar(self) -> list[ReplayBar]:
        """A ReplayBar to compose when the app replays a recording, else nothing."""
        return [ReplayBar()] if self.app.replay else []
