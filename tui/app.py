"""The vqscope TUI: a thin App that polls a source and holds the latest data.

The App owns three reactives — ``snapshot`` (the latest Snapshot),
``rates`` (per queue, between the last two snapshots) and ``gone`` (None, or
why the source does not answer) — and the screens watch them. A thread worker
polls the source, because ``Source.snapshot()`` may block on a socket.

:class:`ReplayApp` is the same app over a recording (``vqscope tui --replay
FILE``): the same screens, plus a time cursor moved by keys and by playback,
shown in a ReplayBar.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.reactive import var
from textual.worker import get_current_worker

from inspector.errors import InspectorError, SourceError
from inspector.snapshot.model import QueueId, Snapshot
from inspector.sources import open_source
from inspector.sources.base import Source
from inspector.sources.replay import Cursor, ReplayFrame, ReplaySource

from .messages import SnapshotReceived, SourceGone
from .rates import QueueRates, queue_rates
from .screens.help import HelpScreen
from .screens.main import MainScreen


class VqscopeApp(App):
    """Live view of every queue of ``source`` (an inspector.sources.Source),
    polled every ``interval`` seconds. The caller keeps ownership of the
    source (and closes it)."""

    CSS_PATH = "vqscope.tcss"
    TITLE = "vqscope"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Keys", key_display="?"),
    ]

    #: True in ReplayApp: screens add the ReplayBar and say "recorded", not "live".
    replay: ClassVar[bool] = False

    # always_update: a new Snapshot is always news (the app sets only new
    # ones), and comparing two would build every queue's chains.
    snapshot: var[Snapshot | None] = var(None, always_update=True)
    rates: var[dict] = var(dict)
    gone: var[str | None] = var(None)

    def __init__(self, source: Source, interval: float = 0.25) -> None:
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
        if self.snapshot is not None and snap.time == self.snapshot.time:
            return  # nothing new (a file source, or a back-end that did not move)
        # rates first: watchers of ``snapshot`` read them.
        self.rates = queue_rates(self.snapshot, snap)
        self.snapshot = snap

    def on_source_gone(self, message: SourceGone) -> None:
        self.gone = message.reason

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def replay_rates(frame: ReplayFrame) -> dict[QueueId, QueueRates]:
    """Per-queue rates over the recorded interval that ends at the cursor
    (snapshot ``index − 1`` to ``index``): from the snapshots' counters, as
    live, except kicks/s and calls/s of a queue whose kicks (calls) the
    recording holds as events: those are counted from the events."""
    rates = queue_rates(frame.previous, frame.snapshot)
    if frame.previous is None:
        return rates
    dt = frame.snapshot.time - frame.previous.time
    if dt <= 0:
        return rates

    def from_events(device: str, queue: int, kind: str, counters: float | None) -> float | None:
        if (device, queue, kind) not in frame.event_keys:
            return counters
        return frame.event_counts.get((device, queue, kind), 0) / dt

    return {(dev, q): replace(r, kicks=from_events(dev, q, "kick", r.kicks), calls=from_events(dev, q, "call", r.calls))
            for (dev, q), r in rates.items()}


class ReplayApp(VqscopeApp):
    """VqscopeApp over a :class:`inspector.sources.replay.ReplaySource`.

    The poll worker advances playback (``source.tick()``) every ``interval``
    seconds at most 0.05 s, and posts a FrameReceived whenever the cursor
    moved, so keys (which only move the cursor) show within 50 ms. The
    screens are the live ones; ``cursor`` feeds the ReplayBar.
    """

    replay: ClassVar[bool] = True

    # Priority: the tables' own left/right/home/end would take them first.
    BINDINGS = [
        Binding("space", "toggle", "Play/pause", key_display="space", priority=True),
        Binding("left", "step(-1)", "Step back", key_display="←", priority=True),
        Binding("right", "step(1)", "Step", key_display="→", priority=True),
        Binding("n", "anomaly(1)", "Next anomaly", priority=True),
        Binding("N,p", "anomaly(-1)", "Prev anomaly", key_display="N", priority=True),
        Binding("home", "start", "Start", priority=True),
        Binding("end", "end", "End", priority=True),
        Binding("plus,equals_sign", "faster", "Faster", key_display="+", priority=True),
        Binding("minus", "slower", "Slower", key_display="-", priority=True),
    ]

    cursor: var[Cursor | None] = var(None)

    @dataclass
    class FrameReceived(Message):
        """The cursor moved; ``frame`` has its snapshot and recorded events."""

        frame: ReplayFrame

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        worker = get_current_worker()
        shown = None
        while not worker.is_cancelled:
            try:
                if self.source.tick() != shown:
                    frame = self.source.frame()
                    shown = frame.cursor
                    self.post_message(self.FrameReceived(frame))
                    # While the first frame is looked at: the one pass over
                    # the event totals that every later frame needs.
                    self.source.event_keys()
            except InspectorError as e:  # SourceError, the reader's RecordingError
                self.post_message(SourceGone(str(e)))
            worker.cancelled_event.wait(min(self.interval, 0.05))

    def on_replay_app_frame_received(self, message: FrameReceived) -> None:
        frame = message.frame
        self.gone = None
        # rates first: watchers of ``snapshot`` read them.
        self.rates = replay_rates(frame)
        self.cursor = frame.cursor
        self.snapshot = frame.snapshot

    def action_toggle(self) -> None:
        self.source.toggle()

    def action_step(self, delta: int) -> None:
        self.source.step(delta)

    def action_anomaly(self, direction: int) -> None:
        moved = self.source.next_anomaly() if direction > 0 else self.source.prev_anomaly()
        if moved is None:
            where = "after" if direction > 0 else "before"
            self.notify(f"no new anomaly {where} snapshot {self.source.index + 1}", timeout=3)

    def action_start(self) -> None:
        self.source.to_start()

    def action_end(self) -> None:
        self.source.to_end()

    def action_faster(self) -> None:
        self.source.faster()

    def action_slower(self) -> None:
        self.source.slower()


def run_tui(args: argparse.Namespace) -> int:
    """``vqscope tui``: open the source the arguments name and run the app
    (ReplayApp for ``--replay FILE``)."""
    with open_source(args) as source:
        app_class = ReplayApp if isinstance(source, ReplaySource) else VqscopeApp
        app_class(source, interval=args.interval).run()
    return 0
