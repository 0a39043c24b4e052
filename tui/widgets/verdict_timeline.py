"""Under the header of a replay: the recording's verdict changes on a time
line, the cursor on it, and the last change at or before the cursor."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from inspector.analysis import Severity
from inspector.sources.replay import Cursor

from ..render import SEVERITY_MARK, SEVERITY_STYLE, clock_text
from ..verdicts import VerdictTimeline

LABEL = "verdicts "
TRACK = "─"


def track(timeline: VerdictTimeline, start: float, end: float, width: int,
          cursor_time: float | None = None) -> Text:
    """``width`` cells for the recorded time ``start``..``end``: each
    verdict change that is news as the mark of its new verdict (▲ a problem,
    red or yellow; ● back to healthy/idle, green; the worst wins a cell),
    ─ elsewhere; the cell of ``cursor_time`` reversed."""
    width = max(width, 1)
    span = end - start

    def cell(t: float) -> int:
        return 0 if span <= 0 else min(width - 1, max(0, int((t - start) / span * (width - 1) + 0.5)))

    worst: dict[int, Severity] = {}
    for d in timeline.news:
        c = cell(d.time)
        worst[c] = max(worst.get(c, d.severity), d.severity)
    out = Text()
    here = None if cursor_time is None else cell(cursor_time)
    for c in range(width):
        sev = worst.get(c)
        mark, style = (TRACK, "dim") if sev is None else (SEVERITY_MARK[sev], SEVERITY_STYLE[sev])
        if c == here:
            style = f"{style} reverse".strip() if sev is not None else "reverse"
            mark = mark if sev is not None else "┃"
        out.append(mark, style)
    return out


class VerdictTimelineBar(Widget):
    """Two lines: ``verdicts`` and the track (see :func:`track`), then how
    many changes, and the last one at or before the cursor (queue, verdict,
    what it was, evidence). Follows ``app.verdicts`` and ``app.cursor``."""

    cursor: reactive[Cursor | None] = reactive(None)
    timeline: reactive[VerdictTimeline | None] = reactive(None)
    error: reactive[str | None] = reactive(None)

    def on_mount(self) -> None:
        self.watch(self.app, "cursor", self._follow_cursor)
        self.watch(self.app, "verdicts", self._follow_timeline)
        self.watch(self.app, "verdicts_error", self._follow_error)

    def _follow_cursor(self, cursor: Cursor | None) -> None:
        self.cursor = cursor

    def _follow_timeline(self, timeline: VerdictTimeline | None) -> None:
        self.timeline = timeline

    def _follow_error(self, error: str | None) -> None:
        self.error = error

    def render(self) -> Text:
        c, tl = self.cursor, self.timeline
        if self.error is not None:
            return Text.assemble((LABEL, "bold"), ("cannot read the verdicts: ", "bold red"), self.error)
        if tl is None or c is None:
            return Text.assemble((LABEL, "bold"), ("reading the recording's verdicts…", "dim"))
        width = self.content_size.width - len(LABEL)
        line1 = Text.assemble((LABEL, "bold"), track(tl, c.start, c.end, width, c.time))
        n = len(tl.news)
        summary = Text(f"{n} verdict change{'' if n == 1 else 's'}  │  ")
        last = tl.last_news(c.time)
        if last is None:
            summary.append("none at or before the cursor", "dim")
        else:
            was = tl.previous(last)
            summary.append_text(Text.assemble(
                f"last at or before the cursor: {clock_text(last.time)} {last.device} q{last.index} ",
                (f"{SEVERITY_MARK[last.severity]} {last.verdict.value}", SEVERITY_STYLE[last.severity]),
                f" (was {was.verdict.value})" if was is not None else "",
                f" — {last.evidence}" if last.evidence else ""))
        summary.truncate(max(self.content_size.width, 1), overflow="ellipsis")
        return Text("\n").join([line1, summary])
