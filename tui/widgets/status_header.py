"""One line at the top of every screen: source, snapshot time, queue count, status."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..render import time_text


class StatusHeader(Widget):
    """Shows where the data comes from and whether it is live.

    ``gone`` is None while the source answers, else the reason it does not;
    the last snapshot's time and queue count stay on screen either way.
    ``live`` is False for a replayed recording (the status says "recorded").
    """

    source_name: reactive[str] = reactive("")
    snap_time: reactive[float | None] = reactive(None)
    queue_count: reactive[int | None] = reactive(None)
    gone: reactive[str | None] = reactive(None)
    live: reactive[bool] = reactive(True)

    def watch_gone(self, gone: str | None) -> None:
        self.set_class(gone is not None, "-gone")

    def status_text(self) -> str:
        if self.gone is not None:
            return f"source gone: {self.gone}"
        if self.snap_time is None:
            return "waiting for the first snapshot"
        return "live" if self.live else "recorded"

    def render(self) -> Text:
        queues = "" if self.queue_count is None else f"{self.queue_count} queue{'' if self.queue_count == 1 else 's'}"
        return Text.assemble(
            ("vqscope", "bold"), "  ", self.source_name, "  ", time_text(self.snap_time),
            "  ", queues, "  ", (self.status_text(), "bold"),
        )
