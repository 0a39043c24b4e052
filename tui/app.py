"""The vqscope TUI: a thin App that polls a source and holds the latest data.

The App owns four reactives — ``snapshot`` (the latest Snapshot),
``rates`` (per queue, between the last two snapshots), ``diagnoses`` (per
queue, the analyzer's verdict: inspector.analysis) and ``gone`` (None, or
why the source does not answer) — and the screens watch them; ``history``
keeps the last minute of rates for the sparklines. A thread worker polls the
source, because ``Source.snapshot()`` may block on a socket, drains its
events and feeds both to the app's :class:`~inspector.analysis.Analyzer`.

:class:`ReplayApp` is the same app over a recording (``vqscope tui --replay
FILE``): the same screens, plus a time cursor moved by keys and by playback,
shown in a ReplayBar, and the recording's verdict changes
(:mod:`tui.verdicts`) in a VerdictTimeline.
"""

from __future__ import annotations

import argparse
import bisect
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.reactive import var
from textual.worker import get_current_worker

from inspector.analysis import Analyzer, Diagnosis, Thresholds
from inspector.errors import InspectorError, SourceError
from inspector.events import Event
from inspector.snapshot.model import QueueId, Snapshot
from inspector.sources import open_source
from inspector.sources.base import Source
from inspector.sources.replay import Cursor, ReplayFrame, ReplaySource

from .messages import SnapshotReceived, SourceGone
from .rates import QueueRates, RateHistory, queue_rates
from .screens.help import HelpScreen
from .screens.main import MainScreen
from .verdicts import VerdictTimeline, read_verdict_timeline


class VqscopeApp(App):
    """Live view of every queue of ``source`` (an inspector.sources.Source),
    polled every ``interval`` seconds, with a verdict per queue from an
    :class:`~inspector.analysis.Analyzer` with ``thresholds``. ``first``: a
    snapshot already taken (``run_tui`` takes one before the app starts, so
    a source that cannot be read at all is an error, not a screen); it is
    shown first. The caller keeps ownership of the source (and closes it)."""

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
    diagnoses: var[dict] = var(dict, always_update=True)
    gone: var[str | None] = var(None)

    def __init__(self, source: Source, interval: float = 0.25, first: Snapshot | None = None,
                 thresholds: Thresholds = Thresholds()) -> None:
        if not interval > 0:
            raise InspectorError(f"refresh interval must be more than 0 seconds, got {interval}")
        super().__init__()
        self.source = source
        self.interval = interval
        self._first = first
        #: The analyzer; fed only by the poll worker (one thread).
        self.analyzer = Analyzer(thresholds, notifications_seen=source.has_events)
        #: Whether the source's kick and call counters are real (the queue
        #: screen says "not visible to this source" otherwise).
        self.notifications_seen = source.has_events
        #: The last minute of rates, per queue (the queue screen's sparklines).
        self.history = RateHistory(thresholds.window_s)

    def get_default_screen(self) -> MainScreen:
        return MainScreen()

    def on_mount(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        """Ask the source every ``interval`` seconds until the app ends,
        drain its events, and feed each new snapshot (a new ``time``) with
        the events seen since the previous one to the analyzer; a
        SourceError is reported and the next round tries again; an analyzer
        that raises is reported once and the snapshots go on without new
        verdicts."""
        worker = get_current_worker()
        first, self._first = self._first, None
        last_time: float | None = None
        events: list[Event] = []
        analyzer_failed = False
        while not worker.is_cancelled:
            started = time.monotonic()
            try:
                snap = first if first is not None else self.source.snapshot()
                first = None
                events += self.source.events()
            except SourceError as e:
                self.post_message(SourceGone(str(e)))
            else:
                diagnoses = None
                if snap.time != last_time:
                    try:
                        self.analyzer.update(snap, events)
                        diagnoses = self.analyzer.diagnoses
                    except Exception as e:  # a bug in a rule must not stop the live view
                        if not analyzer_failed:
                            analyzer_failed = True
                            self.call_from_thread(self.notify, f"analyzer error, verdicts not updated: {e!r}",
                                                  severity="error", timeout=30)
                    events, last_time = [], snap.time
                self.post_message(SnapshotReceived(snap, diagnoses))
            worker.cancelled_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        snap = message.snapshot
        self.gone = None
        if self.snapshot is not None and snap.time == self.snapshot.time:
            return  # nothing new (a file source, or a back-end that did not move)
        self.show(snap, queue_rates(self.snapshot, snap), message.diagnoses)

    def show(self, snap: Snapshot, rates: dict[QueueId, QueueRates],
             diagnoses: dict[QueueId, Diagnosis] | None) -> None:
        """Put a new snapshot on screen with its rates (recorded in
        ``history``) and diagnoses (None: keep the current ones)."""
        self.history.record(snap.time, rates)
        # rates and diagnoses first: watchers of ``snapshot`` read them.
        self.rates = rates
        if diagnoses is not None:
            self.diagnoses = diagnoses
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
    moved, so keys (which only move the cursor) show within 50 ms. After the
    first frame it reads the recording's verdict changes once
    (:func:`tui.verdicts.read_verdict_timeline`) and posts VerdictsRead; the
    diagnoses shown at a cursor are those in force at its time. The screens
    are the live ones; ``cursor`` feeds the ReplayBar, ``verdicts`` the
    VerdictTimeline; ``n``/``N`` stop at new anomalies and verdict changes.
    """

    replay: ClassVar[bool] = True

    # Priority: the tables' own left/right/home/end would take them first.
    BINDINGS = [
        Binding("space", "toggle", "Play/pause", key_display="space", priority=True),
        Binding("left", "step(-1)", "Step back", key_display="←", priority=True),
        Binding("right", "step(1)", "Step", key_display="→", priority=True),
        Binding("n", "jump(1)", "Next anomaly/verdict", priority=True),
        Binding("N,p", "jump(-1)", "Prev", key_display="N", priority=True),
        Binding("home", "start", "Start", priority=True),
        Binding("end", "end", "End", priority=True),
        Binding("plus,equals_sign", "faster", "Faster", key_display="+", priority=True),
        Binding("minus", "slower", "Slower", key_display="-", priority=True),
    ]

    _stops: tuple[int, ...] = ()

    cursor: var[Cursor | None] = var(None)
    #: The recording's verdict changes; None until read.
    verdicts: var[VerdictTimeline | None] = var(None)
    #: Why the verdict changes could not be read, or None.
    verdicts_error: var[str | None] = var(None)

    @dataclass
    class FrameReceived(Message):
        """The cursor moved; ``frame`` has its snapshot and recorded events."""

        frame: ReplayFrame

    @dataclass
    class VerdictsRead(Message):
        """The recording's verdict changes (``timeline``), or why not (``error``)."""

        timeline: VerdictTimeline | None
        error: str | None = None

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        worker = get_current_worker()
        shown = None
        read = False
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
            if not read and shown is not None:
                read = True
                self.post_message(self._read_verdicts())
            worker.cancelled_event.wait(min(self.interval, 0.05))

    def _read_verdicts(self) -> VerdictsRead:
        """The recording's verdict changes as a message (one pass over the file)."""
        try:
            return self.VerdictsRead(read_verdict_timeline(self.source))
        except InspectorError as e:
            return self.VerdictsRead(None, str(e))

    def on_replay_app_frame_received(self, message: FrameReceived) -> None:
        frame = message.frame
        snap = frame.snapshot
        self.gone = None
        history = self.history
        if history.last_time != snap.time and (frame.previous is None or history.last_time != frame.previous.time):
            history.clear()  # the cursor jumped: the last minute is not what was on screen
        self.cursor = frame.cursor
        if history.last_time == snap.time:  # the same snapshot (the speed changed)
            self.snapshot = snap
            return
        self.show(snap, replay_rates(frame), self.verdicts.at(snap.time) if self.verdicts else None)

    def on_replay_app_verdicts_read(self, message: VerdictsRead) -> None:
        self.verdicts_error = message.error
        timeline = message.timeline
        if timeline is None:
            return
        self.notifications_seen = timeline.notifications_seen
        self.verdicts = timeline
        self._stops = tuple(sorted(set(timeline.stops) | set(self.source.anomaly_indices())))
        if self.snapshot is not None:
            self.diagnoses = timeline.at(self.snapshot.time)
            self.snapshot = self.snapshot  # redraw with them

    def stops(self) -> list[int]:
        """The snapshot indices ``n``/``N`` stop at, ascending: new
        anomalies, and verdict changes once read."""
        return list(self._stops) if self.verdicts is not None else self.source.anomaly_indices()

    def action_toggle(self) -> None:
        self.source.toggle()

    def action_step(self, delta: int) -> None:
        self.source.step(delta)

    def action_jump(self, direction: int) -> None:
        """To the next (``direction`` > 0) or previous snapshot where a new
        anomaly appeared or a verdict changed; says so when there is none."""
        here = self.source.tick().index
        stops = self.stops()
        if direction > 0:
            k = bisect.bisect_right(stops, here)
            target = stops[k] if k < len(stops) else None
        else:
            k = bisect.bisect_left(stops, here)
            target = stops[k - 1] if k > 0 else None
        if target is None:
            where = "after" if direction > 0 else "before"
            self.notify(f"no new anomaly or verdict change {where} snapshot {here + 1}", timeout=3)
        else:
            self.source.seek(target)

    def action_start(self) -> None:
        self.source.to_start()

    def action_end(self) -> None:
        self.source.to_end()

    def action_faster(self) -> None:
        self.source.faster()

    def action_slower(self) -> None:
        self.source.slower()


def run_tui(args: argparse.Namespace) -> int:
    """``vqscope tui``: open the source the arguments name, take its first
    snapshot, and run the app (ReplayApp for ``--replay FILE``, whose source
    read its first snapshot when it opened). A source that cannot be opened
    or read raises here (InspectorError: ``vqscope tui: ...``, exit 2, as
    ``vqscope snapshot``); one that goes away later is shown as gone."""
    with open_source(args) as source:
        if isinstance(source, ReplaySource):
            ReplayApp(source, interval=args.interval).run()
        else:
            VqscopeApp(source, interval=args.interval, first=source.snapshot()).run()
    return 0
