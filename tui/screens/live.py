"""Base for screens that follow the app's live (or replayed) snapshot."""

from __future__ import annotations

from textual.screen import Screen

from inspector.snapshot.model import QueueEntry, Snapshot

from ..widgets.replay_bar import ReplayBar
from ..widgets.status_header import StatusHeader
from ..widgets.verdict_timeline import VerdictTimelineBar


class LiveScreen(Screen):
    """Keeps the StatusHeader in step with the app (source name, gone,
    snapshot time, queue and problem counts) and calls :meth:`show_queues`
    with each new snapshot's queues. A screen under another one skips the
    work and catches up when it is on top again."""

    _stale = False

    def on_mount(self) -> None:
        header = self.query_one(StatusHeader)
        header.source_name, header.live = self.app.source.name, not self.app.replay
        self.watch(self.app, "gone", self._show_gone)
        self.watch(self.app, "snapshot", self._show_snapshot)

    def on_screen_resume(self) -> None:
        if self._stale:
            self._show_snapshot(self.app.snapshot)

    def _show_gone(self, gone: str | None) -> None:
        self.query_one(StatusHeader).gone = gone

    def _show_snapshot(self, snap: Snapshot | None) -> None:
        if snap is None:
            return
        if not self.is_active:
            self._stale = True
            return
        self._stale = False
        header = self.query_one(StatusHeader)
        header.snap_time, header.queue_count = snap.time, len(snap.queues)
        diagnoses = self.app.diagnoses
        header.problems = (sum(1 for q in snap.queues if (d := diagnoses.get(q.id)) is not None and not d.ok)
                           if diagnoses else None)
        self.show_queues(snap.queues)

    def show_queues(self, queues: list[QueueEntry]) -> None:
        """Render the queues of a new snapshot (override)."""

    def replay_bar(self) -> list[ReplayBar]:
        """A ReplayBar to compose when the app replays a recording, else nothing."""
        return [ReplayBar()] if self.app.replay else []

    def verdict_timeline(self) -> list[VerdictTimelineBar]:
        """A VerdictTimelineBar (under the header) when the app replays a
        recording, else nothing."""
        return [VerdictTimelineBar()] if self.app.replay else []
