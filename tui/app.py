"""The vqscope TUI: a thin App that polls a source and holds the latest data.

The App owns three reactives — ``snapshot`` (the latest snapshot dict),
``rates`` (per queue, between the last two snapshots) and ``gone`` (None, or
why the source does not answer) — and the screens watch them. A thread worker
polls the source, because ``Source.snapshot()`` may block on a socket.
"""

from __future__ import annotations

import argparse
import time

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import var
from textual.worker import get_current_worker

from inspector.errors import InspectorError, SourceError

from .messages import SnapshotReceived, SourceGone
from .rates import queue_rates
from .screens.help import HelpScreen
from .screens.main import MainScreen


class VqscopeApp(App):
    """Live view of every queue of ``source`` (anything with ``.name`` and
    ``.snapshot()``, see inspector.sources.Source), polled every ``interval``
    seconds. The caller keeps ownership of the source (and closes it)."""

    CSS_PATH = "vqscope.tcss"
    TITLE = "vqscope"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Keys", key_display="?"),
    ]

    snapshot: var[dict | None] = var(None)
    rates: var[dict] = var(dict)
    gone: var[str | None] = var(None)

    def __init__(self, source, interval: float = 0.25) -> None:
        if not interval > 0:
            raise InspectorError(f"refresh interval must be more than 0 seconds, got {interval}")
        super().__init__()
        self.source = source
        self.interval = interval

    def get_default_screen(self) -> MainScreen:
        return MainScreen()

    def on_mount(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        """Ask the source every ``interval`` seconds until the app ends; a
        SourceError is reported and the next round tries again."""
        worker = get_current_worker()
        while not worker.is_cancelled:
            started = time.monotonic()
            try:
                snap = self.source.snapshot()
            except SourceError as e:
                self.post_message(SourceGone(str(e)))
            else:
                self.post_message(SnapshotReceived(snap))
            worker.cancelled_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        snap = message.snapshot
        self.gone = None
        if self.snapshot is not None and snap.get("time") == self.snapshot.get("time"):
            return  # nothing new (a file source, or a back-end that did not move)
        # rates first: watchers of ``snapshot`` read them.
        self.rates = queue_rates(self.snapshot, snap)
        self.snapshot = snap

    def on_source_gone(self, message: SourceGone) -> None:
        self.gone = message.reason

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def run_tui(args: argparse.Namespace) -> int:
    """``vqscope tui``: open the source the arguments name and run the app."""
    from inspector.sources import open_source

    with open_source(args) as source:
        VqscopeApp(source, interval=args.interval).run()
    return 0
