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
    ``problems``: how many queues are not healthy or idle (None: no verdict yet).
    """

    source_name: reactive[str] = reactive("")
    snap_time: reactive[float | None] = reactive(None)
    queue_count: reactive[int | None] = reactive(None)
    gone: reactive[str | None] = reactive(None)
    live: reactive[bool] = reactive(True)
    problems: reactive[int | None] = reactive(None)

    def watch_gone(self, gone: str | None) -> None:
        self.set_class(gone is not None, "-gone")

    def status_text(self) -> str:
        if self.gone is not None:
            return f"source gone: {self.gone}"
        if self.snap_time is None:
            return "waiting for the first snapshot"
        return "live" if self.live else "recorded"

    def render(self) -> Text:
        parts = [Text("vqscope", "bold"), Text(self.source_name), Text(time_text(self.snap_time))]
        if self.queue_count is not None:
            parts.append(Text(f"{self.queue_count} queue{'' if self.queue_count == 1 else 's'}"))
        n = self.problems
        if n is not None:
            parts.append(Text("no problems") if n == 0 else Text(f"{n} problem{'' if n == 1 else 's'}", "bold reverse"))
        parts.append(Text(self.status_text(), "bold"))
        return Text("  ").join(parts)
