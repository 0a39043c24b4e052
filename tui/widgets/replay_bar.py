"""One line above the footer of a replay: where the time cursor stands."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from inspector.sources.replay import Cursor

from ..render import ANOMALY_STYLE, time_text


def speed_text(speed: float) -> str:
    """``1×``, ``0.25×``, ``100×``: recorded seconds per wall second."""
    return f"{speed:g}×"


class ReplayBar(Widget):
    """Playing or paused, speed, the recorded time of the cursor's snapshot
    (UTC, ms) and its offset from the first, ``snapshot i/n`` (1-based),
    whether a new anomaly appeared there and how many such snapshots lie at
    or before it, and the recording's file name. Follows ``app.cursor``."""

    cursor: reactive[Cursor | None] = reactive(None)
    file_name: reactive[str] = reactive("")

    def on_mount(self) -> None:
        self.file_name = self.app.source.file_name
        self.watch(self.app, "cursor", self._follow)

    def _follow(self, cursor: Cursor | None) -> None:
        self.cursor = cursor
        self.set_class(cursor is not None and cursor.playing, "-playing")

    def render(self) -> Text:
        c = self.cursor
        if c is None:
            return Text.assemble(("reading the recording…", "bold"), "  ", self.file_name)
        state = ("▶ playing", "bold") if c.playing else ("⏸ paused", "bold")
        anomaly = ("new anomaly", ANOMALY_STYLE) if c.anomaly else ""
        return Text.assemble(
            state, f" {speed_text(c.speed)}", "  │  ", (time_text(c.time), "bold"), f"  +{c.time - c.start:.3f} s",
            "  │  ", f"snapshot {c.index + 1}/{c.count}", "  │  ", f"anomalies {c.anomalies_seen}/{c.anomalies}",
            "  ", anomaly, "  │  ", self.file_name,
        )
