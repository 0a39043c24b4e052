"""The queue screen's ring: its slots as a bar, the indices marked under it."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text
from textual.widget import Widget

from inspector.snapshot.model import QueueEntry

from ..pictures import ring_picture
from ..render import LABEL_WIDTH, labeled


class RingPicture:
    """A rich renderable: :func:`tui.pictures.ring_picture` of ``queue``
    (None: the queue is gone) laid out for the width it is given."""

    def __init__(self, queue: QueueEntry | None):
        self.queue = queue

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.queue is None:
            lines = [Text("this queue is not in the latest snapshot", "dim")]
        else:
            lines = ring_picture(self.queue, options.max_width - LABEL_WIDTH)
        yield labeled([("ring" if i == 0 else "", line) for i, line in enumerate(lines)])


class RingView(Widget):
    """The ring of one queue, scaled to the widget's width (redrawn on
    resize); ``show(None)``: the queue is gone."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.queue: QueueEntry | None = None
        self._shown_height = 0

    def show(self, queue: QueueEntry | None) -> None:
        """Draw ``queue``; the screen is laid out again only when the
        picture's height may have changed (its marker rows)."""
        height = self._height(queue)
        self.queue = queue
        self.refresh(layout=height != self._shown_height)
        self._shown_height = height

    def _height(self, queue: QueueEntry | None) -> int:
        width = self.content_size.width or self.app.size.width
        return len(ring_picture(queue, width - LABEL_WIDTH)) if queue is not None else 1

    def render(self) -> RingPicture:
        return RingPicture(self.queue)
