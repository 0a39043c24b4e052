"""Replay of a recording: the time cursor (inspector/sources/replay.py), the
ReplayApp's keys and bar (tui/app.py, tui/widgets/replay_bar.py), the CLI
(`vqscope tui|snapshot --replay FILE`), a screen snapshot, and a recording of
a real back-end with real traffic replayed end to end.

Every test but the pure cursor arithmetic reads a REAL recording file: one
written by the recorder's RecordingWriter from fixed data (so screens are
deterministic), or one `vqscope record` made of a running back-end.

Snapshots: `pytest tests/unit/test_tui_replay.py --snapshot-update` after a
deliberate change of the screens, then review the SVGs under
tests/__snapshots__/test_tui_replay/.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

from inspector.analysis import Diagnosis, Verdict
from inspector.errors import InspectorError, SourceError
from inspector.events import Event
from inspector.snapshot import to_json
from inspector.sources import open_source
from inspector.sources.replay import SPEEDS, ReplaySource, to_ns
from tui.app import ReplayApp, VqscopeApp, replay_rates, run_tui
from tui.rates import QueueRates
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.screens.queue import QueueScreen
from tui.widgets.anomaly_table import AnomalyTable
from tui.widgets.queue_table import QueueTable
from tui.widgets.replay_bar import ReplayBar
from tui.widgets.status_header import StatusHeader
from tui.widgets.verdict_timeline import VerdictTimelineBar, track
from tui.verdicts import VerdictTimeline, read_verdict_timeline

from tests.conftest import ROOT, VQSCOPE

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE = json.loads((DATA / "snapshot_sample.json").read_text())
SIZE = (200, 30)
T0 = SAMPLE["time"]  # 2025-11-21 08:25:01.250 UTC
STEP = 0.5  # recorded seconds between snapshots
COUNT = 6
ANOMALY_AT = (2, 3, 5)  # snapshots where queue 1 has its anomaly: new at 2 and (again) at 5
TX_KICK_EVENTS = 5  # kick events of net0 queue 1 per snapshot index: 5·i between snapshot i−1 and i


def series() -> list[dict]:
    """COUNT snapshots of the sample, STEP s apart: counters and indices move,
    queue 1's anomaly comes at 2, stays at 3, is gone at 4, comes back at 5."""
    out = []
    for i in range(COUNT):
        s = copy.deepcopy(SAMPLE)
        s["time"] = T0 + STEP * i
        rx, tx = s["queues"]
        rx["kicks"] += 2 * i
        rx["calls"] += 50 * i
        rx["packets"] += 100 * i
        tx["kicks"] += 50 * i
        tx["calls"] += 10 * i
        tx["packets"] += 60 * i
        for q in (rx, tx):
            for idx in ("avail_idx", "used_idx", "last_avail_idx", "used_event", "avail_event"):
                q[idx] = (q[idx] + 60 * i) % 65536
        if i not in ANOMALY_AT:
            tx["anomalies"] = []
        out.append(s)
    return out


def series_events() -> list[list[Event]]:
    """Per snapshot i, the events recorded with it: 5·i kicks of net0 queue 1
    spread over (t(i−1), t(i)), none for queue 0, no calls."""
    out = [[]]
    for i in range(1, COUNT):
        start = to_ns(T0 + STEP * (i - 1))
        n = TX_KICK_EVENTS * i
        # Strictly inside: snapshot times are floats, good to a few hundred ns only.
        out.append([Event(start + (k + 1) * to_ns(STEP) // (n + 1), "net0", 1, "kick", 1) for k in range(n)])
    return out


MESSAGES = [  # two before the first snapshot (the handshake), one at 1.2 s
    {"conn": 1, "time": T0 - 0.2, "request": "GET_FEATURES", "flags": 1, "size": 0, "nfds": 0, "fields": {}},
    {"conn": 1, "time": T0 - 0.1, "request": "SET_MEM_TABLE", "flags": 1, "size": 40, "nfds": 1,
     "fields": {"regions": 1}},
    {"conn": 1, "time": T0 + 1.2, "request": "SET_VRING_ENABLE", "flags": 1, "size": 8, "nfds": 0,
     "fields": {"index": 1, "num": 1}},
]


def write_recording(path: Path) -> Path:
    """A real recording file of series(), series_events() and MESSAGES,
    written by the recorder's own writer."""
    from inspector.record.writer import RecordingWriter

    snaps, events = series(), series_events()
    with RecordingWriter(str(path), {"source": SAMPLE["source"], "vqscope_version": "test"}) as w:
        for i, snap in enumerate(snaps):
            msgs = [m for m in MESSAGES if (i == 0 and m["time"] <= snap["time"])
                    or (i > 0 and snaps[i - 1]["time"] < m["time"] <= snap["time"])]
            w.write_interval(snap, events[i], msgs)
    return path


@pytest.fixture
def recording(tmp_path) -> Path:
    # A fixed file name: the replay bar shows it, and screen snapshots must not vary.
    return write_recording(tmp_path / "demo.vqs")


class Clock:
    """A wall clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRecording:
    """The reader's interface over in-memory snapshots, for the pure cursor
    arithmetic only (playback against a hand-moved clock)."""

    def __init__(self, times: list[float], anomalies: list[int]):
        self.times, self.anomalies, self.closed = times, anomalies, False

    def snapshot_times(self) -> list[float]:
        return list(self.times)

    def anomaly_indices(self) -> list[int]:
        return list(self.anomalies)

    def snapshot(self, i: int) -> dict:
        return {"source": "fake", "time": self.times[i], "queues": []}

    def close(self) -> None:
        self.closed = True


def fake_source(times=(0.0, 1.0, 2.0, 3.0, 10.0), anomalies=(1, 3)) -> tuple[ReplaySource, Clock]:
    clock = Clock()
    return ReplaySource("x/fake.vqs", recording=FakeRecording(list(times), list(anomalies)), clock=clock), clock


# --- the cursor (pure arithmetic) ------------------------------------------


def test_cursor_starts_paused_on_the_first_snapshot():
    src, _ = fake_source()
    c = src.cursor()
    assert (c.index, c.count, c.time, c.playing, c.speed) == (0, 5, 0.0, False, 1.0)
    assert src.file_name == "fake.vqs" and src.name == "fake"


def test_play_follows_recorded_time_at_the_speed_and_stops_at_the_end():
    src, clock = fake_source()
    src.play()
    clock.now += 0.99
    assert src.tick().index == 0  # 0.99 recorded seconds: snapshot 1 (at 1.0) not reached
    clock.now += 0.02
    assert src.tick().index == 1
    src.set_speed(2.0)  # from 1.01 on, twice as fast
    clock.now += 1.0
    assert src.tick().index == 3  # 1.01 + 2.0 = 3.01
    clock.now += 3.0
    c = src.tick()
    assert c.index == 3 and c.playing  # 9.01 < 10.0
    clock.now += 1.0
    c = src.tick()
    assert c.index == 4 and not c.playing  # paused on the last snapshot
    assert src.play().index == 0  # play on the last snapshot starts over


def test_paused_cursor_does_not_move_with_time():
    src, clock = fake_source()
    src.play()
    clock.now += 1.5
    assert src.pause().index == 1
    clock.now += 100
    assert src.tick().index == 1
    src.toggle()
    clock.now += 1.0  # resumes from snapshot 1's time, not from where the wall clock is
    assert src.tick().index == 2


def test_step_pauses_and_clamps():
    src, _ = fake_source()
    src.play()
    c = src.step(1)
    assert c.index == 1 and not c.playing
    assert src.step(-1).index == 0 and src.step(-1).index == 0
    assert src.to_end().index == 4 and src.step(1).index == 4
    assert src.to_start().index == 0


def test_anomaly_jumps_and_ends():
    src, _ = fake_source()
    assert src.next_anomaly().index == 1
    assert src.cursor().anomaly and src.cursor().anomalies_seen == 1
    assert src.next_anomaly().index == 3
    assert src.next_anomaly() is None and src.index == 3  # none after: unmoved
    src.to_end()
    assert src.prev_anomaly().index == 3 and src.prev_anomaly().index == 1
    assert src.prev_anomaly() is None and src.index == 1
    c = src.step(1)
    assert not c.anomaly and (c.anomalies_seen, c.anomalies) == (1, 2)


def test_speeds_step_through_the_list_and_stop_at_its_ends():
    src, _ = fake_source()
    assert src.faster().speed == 2.0 and src.slower().speed == 1.0
    for _ in range(len(SPEEDS)):
        src.faster()
    assert src.speed == SPEEDS[-1]
    for _ in range(len(SPEEDS)):
        src.slower()
    assert src.speed == SPEEDS[0]
    with pytest.raises(InspectorError, match="speed"):
        src.set_speed(0)


@pytest.mark.parametrize("spec, index", [
    ("1", 0), ("3", 2), ("-1", 4), ("-5", 0),
    ("+2.5", 2), ("+0", 0), ("+99", 4),
    ("3.0", 3), ("-100.0", 0),  # epoch seconds (the fake's clock starts at 0)
    ("1970-01-01T00:00:02.5", 2), ("1970-01-01T00:00:10+00:00", 4),
])
def test_seek_spec(spec, index):
    src, _ = fake_source()
    assert src.seek_spec(spec).index == index


@pytest.mark.parametrize("spec", ["0", "6", "-6", "soon", "+x"])
def test_seek_spec_refuses_what_is_not_a_position(spec):
    src, _ = fake_source()
    with pytest.raises(SourceError, match="--at"):
        src.seek_spec(spec)


def test_moving_the_cursor_never_waits_for_the_file():
    # Keys move the cursor on the UI thread while the poll worker reads the
    # file (a long first pass over an hour of events): they must not block.
    import threading

    src, _ = fake_source()
    reading, release = threading.Event(), threading.Event()

    def slow_snapshot(i):
        reading.set()
        release.wait(10)
        return {"source": "fake", "time": float(i), "queues": []}

    src._cache.clear()
    src._rec.snapshot = slow_snapshot
    worker = threading.Thread(target=src.frame)
    worker.start()
    try:
        assert reading.wait(5)
        assert src.step(1).index == 1 and src.next_anomaly().index == 3 and src.toggle().playing
        assert worker.is_alive()  # done while the read is still held up (a blocked step would outwait it)
    finally:
        release.set()
        worker.join(10)


def test_a_recording_without_snapshots_is_refused_and_closed():
    rec = FakeRecording([], [])
    with pytest.raises(SourceError, match="holds no snapshot"):
        ReplaySource("empty.vqs", recording=rec)
    assert rec.closed


def test_a_missing_file_is_a_source_error():
    with pytest.raises(SourceError, match="no recording at /nonexistent/x.vqs"):
        ReplaySource("/nonexistent/x.vqs")


# --- the source over a real recording ---------------------------------------


def test_snapshots_are_served_exactly_as_recorded(recording):
    with ReplaySource(str(recording)) as src:
        assert len(src) == COUNT and src.anomaly_indices() == [2, 5]
        assert src.name == SAMPLE["source"] and src.file_name == "demo.vqs"
        for i, want in enumerate(series()):
            src.seek(i)
            assert to_json(src.snapshot()) == want
        src.seek(1)  # backwards too
        assert to_json(src.snapshot()) == series()[1]


def test_frame_counts_the_recorded_events_of_the_interval_ending_at_the_cursor(recording):
    with ReplaySource(str(recording)) as src:
        first = src.frame()
        assert first.previous is None and first.event_counts == {} and to_json(first.snapshot) == series()[0]
        assert src.event_keys() == {("net0", 1, "kick")}
        for i in (3, 1, 5):  # any order: the interval is (t(i−1), t(i)]
            frame = src.seek(i) and src.frame()
            assert to_json(frame.previous) == series()[i - 1] and to_json(frame.snapshot) == series()[i]
            assert frame.event_counts == {("net0", 1, "kick"): TX_KICK_EVENTS * i}
            assert frame.event_keys == {("net0", 1, "kick")}


def test_replay_rates_count_recorded_events_where_there_are_any(recording):
    with ReplaySource(str(recording)) as src:
        src.seek(3)
        rates = replay_rates(src.frame())
    # net0 queue 1: 15 kick events in 0.5 s (its counters say 100/s: events win);
    # no call events recorded: calls/s from the counters (+10 per 0.5 s).
    assert rates[("net0", 1)] == QueueRates(kicks=30.0, calls=20.0, packets=120.0)
    # net0 queue 0: no events recorded at all: all from the counters.
    assert rates[("net0", 0)] == QueueRates(kicks=4.0, calls=100.0, packets=200.0)


def test_events_and_messages_are_handed_out_once_as_the_cursor_moves_forward(recording):
    with ReplaySource(str(recording)) as src:
        assert src.events() == []  # at the first snapshot: nothing recorded before it
        assert [m["request"] for m in src.new_messages()] == ["GET_FEATURES", "SET_MEM_TABLE"]
        src.seek(2)
        evs = src.events()
        assert len(evs) == TX_KICK_EVENTS * (1 + 2) and evs == sorted(evs)
        assert evs[0].time_ns > to_ns(T0) and evs[-1].time_ns <= to_ns(T0 + 2 * STEP)
        assert src.new_messages() == []  # SET_VRING_ENABLE is at +1.2 s, after snapshot 2 (+1.0 s)
        assert src.events() == [] and src.new_messages() == []  # nothing twice
        src.seek(3)
        assert len(src.events()) == TX_KICK_EVENTS * 3  # (t2, t3] only: (t0, t2] was handed out
        assert [m["request"] for m in src.new_messages()] == ["SET_VRING_ENABLE"]
        src.seek(0)
        assert src.events() == [] and src.new_messages() == []  # moving back hands out nothing
        src.seek(2)  # ... and playing forward again hands out (t0, t2] again, as replayed
        assert len(src.events()) == TX_KICK_EVENTS * (1 + 2) and src.new_messages() == []


# --- the app: keys, bar, screens --------------------------------------------


def first_sight(path: Path) -> list[Diagnosis]:
    """Each queue of the recording at ``path`` healthy at its first snapshot, and no change."""
    with ReplaySource(str(path)) as src:
        snap = src.snapshot()
    return [Diagnosis(q.device, q.index, Verdict.HEALTHY, since=snap.time, time=snap.time) for q in snap.queues]


def replay_app(path: Path, interval: float = 0.02, steady: bool = True) -> ReplayApp:
    """A ReplayApp of the recording at ``path``; ``steady``: its verdicts
    are :func:`first_sight`'s (the source's ``verdict_changes()``), so the
    screens and keys under test do not depend on the analyzer's rules; else
    the analyzer's, over the recording."""
    src = ReplaySource(str(path))
    if steady:
        changes = first_sight(path)
        src.verdict_changes = lambda: changes
    return ReplayApp(src, interval=interval)


def run_app(app, body) -> None:
    """Run ``body(pilot)`` against ``app`` headless, then close its source."""

    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await body(pilot)

    try:
        asyncio.run(main())
    finally:
        app.source.close()


async def wait_for(pilot, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await pilot.pause(0.02)


def bar_text(app) -> str:
    return str(app.screen.query_one(ReplayBar).render())


async def shown(pilot, index: int, snapshot: dict | None = None) -> None:
    """Wait until the screen shows snapshot ``index`` (the bar and the table
    agree), which is ``snapshot`` (its JSON; default: series()[index])."""
    app = pilot.app
    want = series()[index] if snapshot is None else snapshot
    await wait_for(pilot, lambda: app.cursor is not None and app.cursor.index == index
                   and to_json(app.snapshot) == want)
    await pilot.pause()


def static_text(widget) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def cell(app, row: str, column: str) -> str:
    return app.screen.query_one(QueueTable).get_cell(row, column).plain


def test_replay_screen_shows_the_first_snapshot_paused_with_the_recorded_time(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        text = bar_text(app)
        assert "⏸ paused 1×" in text and "2025-11-21 08:25:01.250 UTC" in text and "+0.000 s" in text
        assert "snapshot 1/6" in text and "anomalies 0/2" in text and "demo.vqs" in text
        header = str(app.screen.query_one(StatusHeader).render())
        assert header.startswith(f"vqscope  {SAMPLE['source']}  2025-11-21 08:25:01.250 UTC  2 queues")
        assert header.endswith("recorded")
        assert cell(app, "net0#1", "kicks") == "7390" and cell(app, "net0#1", "kicks_s") == "—"

    run_app(app, body)


def test_right_and_left_step_one_snapshot_and_change_the_time(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await pilot.press("right")
        await shown(pilot, 1)
        assert "08:25:01.750 UTC" in bar_text(app) and "snapshot 2/6" in bar_text(app)
        assert cell(app, "net0#1", "kicks") == "7440"
        assert cell(app, "net0#1", "kicks_s") == "10.0"  # 5 recorded kick events in 0.5 s
        assert cell(app, "net0#0", "packets_s") == "200"  # from the counters
        await pilot.press("right", "right")
        await shown(pilot, 3)
        await pilot.press("left")
        await shown(pilot, 2)
        assert "08:25:02.250 UTC" in bar_text(app) and "+1.000 s" in bar_text(app)

    run_app(app, body)


def test_home_and_end_jump_to_the_first_and_last_snapshot(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await pilot.press("end")
        await shown(pilot, COUNT - 1)
        assert "snapshot 6/6" in bar_text(app) and "08:25:03.750 UTC" in bar_text(app)
        assert cell(app, "net0#1", "kicks") == str(7390 + 50 * (COUNT - 1))
        await pilot.press("home")
        await shown(pilot, 0)
        assert "snapshot 1/6" in bar_text(app)

    run_app(app, body)


def test_n_and_N_p_jump_between_snapshots_where_an_anomaly_appeared(recording):
    app = replay_app(recording)

    async def body(pilot):
        anomalies = app.source.anomaly_indices()
        await shown(pilot, 0)
        await pilot.press("n")
        await shown(pilot, anomalies[0])
        assert "new anomaly" in bar_text(app) and "anomalies 1/2" in bar_text(app)
        assert cell(app, "net0#1", "anomalies") == "1"
        await pilot.press("n")
        await shown(pilot, anomalies[1])
        await pilot.press("n")  # none after: stays, says so
        await wait_for(pilot, lambda: any("no new anomaly or verdict change after snapshot 6" in str(n.message)
                                          for n in app._notifications))
        assert app.source.index == anomalies[1]
        await pilot.press("N")
        await shown(pilot, anomalies[0])
        await pilot.press("end", "p")
        await shown(pilot, anomalies[1] if anomalies[1] < COUNT - 1 else anomalies[0])

    run_app(app, body)


def test_space_plays_to_the_end_and_plus_minus_change_the_speed(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await pilot.press("minus", "minus")
        await wait_for(pilot, lambda: "⏸ paused 0.25×" in bar_text(app))
        await pilot.press("plus", "plus", "plus", "plus", "plus", "plus", "plus", "plus")
        await wait_for(pilot, lambda: "⏸ paused 100×" in bar_text(app))  # 2.5 recorded s in 25 ms
        await pilot.press("space")
        await shown(pilot, COUNT - 1)  # plays through, then pauses on the last snapshot
        await wait_for(pilot, lambda: "⏸ paused 100×" in bar_text(app) and "snapshot 6/6" in bar_text(app))
        await pilot.press("home", "minus", "minus", "minus", "minus", "minus", "minus")
        await wait_for(pilot, lambda: "1×" in bar_text(app) and "snapshot 1/6" in bar_text(app))
        await pilot.press("space")  # 1×: snapshot 2 after 0.5 s
        await wait_for(pilot, lambda: "▶ playing 1×" in bar_text(app))
        assert app.screen.query_one(ReplayBar).has_class("-playing")
        await pilot.press("space")
        await wait_for(pilot, lambda: "⏸ paused" in bar_text(app))
        paused_at = app.source.index
        assert paused_at < COUNT - 1
        await pilot.pause(0.6)
        assert app.source.index == paused_at and app.cursor.index == paused_at

    run_app(app, body)


def test_queue_screen_follows_the_cursor(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen) and app.screen.query(ReplayBar)
        assert app.screen.query_one(AnomalyTable).row_count == 0
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen.query_one(AnomalyTable).row_count == 1)
        assert "snapshot 3/6" in bar_text(app)
        await pilot.press("right", "right")  # snapshot 4: the anomaly is gone
        await wait_for(pilot, lambda: app.screen.query_one(AnomalyTable).row_count == 0)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)

    run_app(app, body)


def test_help_lists_the_replay_keys_only_in_replay(recording):
    app = replay_app(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help").render())
        assert "play / pause" in text and "next / previous snapshot where a new anomaly" in text

    run_app(app, body)
    from tui.screens.help import KEYS

    assert not any("play" in what for _, what in KEYS)  # the live help is unchanged


async def _on_first_anomaly(pilot) -> None:
    await shown(pilot, 0)
    await wait_for(pilot, lambda: pilot.app.verdicts is not None)  # the timeline says what it read
    await pilot.press("n")
    await shown(pilot, 2)


def test_snapshot_replay_screen(snap_compare, recording):
    """Main screen of a replay on snapshot 3/6, where queue 1's anomaly appeared; bar, footer keys."""
    app = replay_app(recording)
    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=_on_first_anomaly)
    finally:
        app.source.close()


def test_snapshot_replay_queue_screen(snap_compare, recording):
    """Queue screen of net0 queue 1 in a replay, on the same snapshot."""
    app = replay_app(recording)

    async def run_before(pilot):
        await _on_first_anomaly(pilot)
        await pilot.press("down", "enter")
        await pilot.pause()

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    finally:
        app.source.close()


# --- verdicts in a replay ----------------------------------------------------

STALL_EVIDENCE = "3 buffers available, none taken for 2.0 s"


def verdict_changes() -> list[Diagnosis]:
    """Each queue healthy at the first snapshot; net0 queue 1 device_stalled
    at snapshot 2 (index 1), healthy again at snapshot 5 (index 4)."""
    def d(index: int, verdict: Verdict, i: int, evidence: str = "") -> Diagnosis:
        t = T0 + STEP * i
        return Diagnosis("net0", index, verdict, since=t, evidence=evidence, time=t)
    return [d(0, Verdict.HEALTHY, 0), d(1, Verdict.HEALTHY, 0),
            d(1, Verdict.DEVICE_STALLED, 1, STALL_EVIDENCE), d(1, Verdict.HEALTHY, 4)]


def replay_app_with_verdicts(path: Path, interval: float = 0.02) -> ReplayApp:
    """A ReplayApp whose source has ``verdict_changes()`` (the replay source's
    method), answering :func:`verdict_changes`."""
    src = ReplaySource(str(path))
    src.verdict_changes = verdict_changes
    return ReplayApp(src, interval=interval)


def test_verdict_timeline_at_a_time_stops_and_news():
    times = [T0 + STEP * i for i in range(COUNT)]
    tl = VerdictTimeline(verdict_changes(), times)
    assert tl.stops == [1, 4]  # a healthy first sight is no news
    assert tl.at(T0 + 0.7)[("net0", 1)].verdict is Verdict.DEVICE_STALLED
    assert tl.at(T0 + 2.0)[("net0", 1)].verdict is Verdict.HEALTHY
    assert tl.at(T0 - 1) == {}
    last = tl.last_news(T0 + 1.0)
    assert last.verdict is Verdict.DEVICE_STALLED and tl.previous(last).verdict is Verdict.HEALTHY
    assert tl.last_news(T0) is None
    # The track: ▲ where the stall began, ● where it ended, the cursor reversed.
    line = track(tl, T0, times[-1], 11, cursor_time=T0)
    assert line.plain == "┃─▲─────●──"


def test_verdict_timeline_of_a_real_replay_source(recording):
    # The replay source's own verdict_changes(): computed over the recording's frames.
    with ReplaySource(str(recording)) as src:
        tl = read_verdict_timeline(src)
    first = tl.changes[:2]
    assert [(d.device, d.index, d.time) for d in first] == [("net0", 0, T0), ("net0", 1, T0)]
    assert all(d.time in tl.times for d in tl.changes)
    assert tl.times == [T0 + STEP * i for i in range(COUNT)] and tl.notifications_seen is False


def test_n_and_N_also_stop_at_verdict_changes(recording):
    app = replay_app_with_verdicts(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await wait_for(pilot, lambda: app.verdicts is not None)
        assert app.stops() == [1, 2, 4, 5]  # verdicts at 1 and 4, new anomalies at 2 and 5
        for index in (1, 2, 4, 5):
            await pilot.press("n")
            await shown(pilot, index)
            if index == 1:
                assert cell(app, "net0#1", "health") == "▲ device_stalled 0.0 s"
                assert app.screen.query_one(QueueTable).order[0] == "net0#1"  # problems first
                assert "1 problem" in str(app.screen.query_one(StatusHeader).render())
        await pilot.press("n")
        await wait_for(pilot, lambda: any("no new anomaly or verdict change after snapshot 6" in str(n.message)
                                          for n in app._notifications))
        for index in (4, 2, 1):
            await pilot.press("N")
            await shown(pilot, index)
        bar = str(app.screen.query_one(VerdictTimelineBar).render())
        assert "2 verdict changes" in bar and f"net0 q1 ▲ device_stalled (was healthy) — {STALL_EVIDENCE}" in bar
        await pilot.press("home")
        await shown(pilot, 0)
        assert cell(app, "net0#1", "health") == "● healthy"
        assert "none at or before the cursor" in str(app.screen.query_one(VerdictTimelineBar).render())

    run_app(app, body)


def test_the_queue_screen_of_a_replay_shows_the_verdict_at_the_cursor(recording):
    app = replay_app_with_verdicts(recording)

    async def body(pilot):
        await shown(pilot, 0)
        await wait_for(pilot, lambda: app.verdicts is not None)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen) and app.screen.queue == ("net0", 1)
        verdict = lambda: static_text(app.screen.query_one("#verdict"))  # noqa: E731
        assert "● healthy" in verdict()
        await pilot.press("right", "right")
        await wait_for(pilot, lambda: "▲ device_stalled  since 08:25:01.7 (0.5 s)" in verdict())
        assert STALL_EVIDENCE in verdict()

    run_app(app, body)


def test_snapshot_replay_verdict_timeline(snap_compare, recording):
    """Replay main screen on snapshot 3/6 (new anomaly): under the header the verdict timeline,
    ▲ at snapshot 2 (net0 q1 device_stalled), ● at snapshot 5 (healthy again), the cursor between;
    the last change before the cursor with its evidence; net0 q1 first, ▲ device_stalled 0.5 s."""
    app = replay_app_with_verdicts(recording)

    async def run_before(pilot):
        await shown(pilot, 0)
        await wait_for(pilot, lambda: app.verdicts is not None)
        await pilot.press("n", "n")  # the stall at snapshot 2, the anomaly at 3
        await shown(pilot, 2)

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    finally:
        app.source.close()


# --- the command line --------------------------------------------------------


def vqscope(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(VQSCOPE + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_tui_replay_of_a_missing_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "missing.vqs"
    out = vqscope("tui", "--replay", str(missing))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"vqscope tui: no recording at {missing}: no such file "
                                       f"(make one with `vqscope record -o FILE`)"]


def test_tui_replay_of_a_file_that_is_no_recording_exits_2(tmp_path):
    bogus = tmp_path / "bogus.vqs"
    bogus.write_text("not sqlite\n" * 100)
    out = vqscope("tui", "--replay", str(bogus))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"vqscope tui: {bogus}: not a vqscope recording")


def test_replay_goes_with_no_other_source(recording):
    out = vqscope("tui", "--replay", str(recording), "--connect", "/tmp/vq.sock")
    assert out.returncode == 2
    assert out.stderr.strip() == "vqscope tui: --replay FILE plays a recording; it does not go with --connect"
    out = vqscope("snapshot", "--connect", "/tmp/vq.sock", "--at", "3")
    assert out.returncode == 2 and "--at goes with --replay FILE" in out.stderr


@pytest.mark.parametrize("at, index", [(None, 0), ("3", 2), ("-1", COUNT - 1), ("+1.2", 2),
                                       ("2025-11-21T08:25:03.3", 4)])
def test_snapshot_replay_at_prints_that_recorded_snapshot(recording, at, index):
    out = vqscope("snapshot", "--replay", str(recording), "--json", *(["--at", at] if at else []))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == series()[index]


def test_snapshot_replay_at_outside_the_recording_exits_2(recording):
    out = vqscope("snapshot", "--replay", str(recording), "--at", "7")
    assert out.returncode == 2
    assert out.stderr.strip() == f"vqscope snapshot: --at 7: recording {recording} has snapshots 1..6 (or -6..-1)"


def test_run_tui_picks_the_replay_app(monkeypatch, recording):
    seen = {}

    def fake_run(self):
        seen.update(cls=type(self), index=self.source.index, interval=self.interval)

    monkeypatch.setattr(VqscopeApp, "run", fake_run)
    args = open_source.__module__ and __import__("argparse").Namespace(
        replay=str(recording), at="-2", interval=0.1, connect=None, qmp=None, file=None, pid=None)
    assert run_tui(args) == 0
    assert seen == {"cls": ReplayApp, "index": COUNT - 2, "interval": 0.1}


# --- a recording of a real back-end, replayed --------------------------------


@pytest.mark.timeout(240)
def test_a_recording_of_real_traffic_replays_in_the_tui(tmp_path):
    """`vqscope record` of `vqscope demo --headless` (our back-end and our
    front-end moving real frames over a real vhost-user socket), then the
    TUI steps and plays the file: each snapshot shown is the one the
    recorder took (its --tee-jsonl copy), in order; rates come from the
    recorded kick/call events; the handshake is in the replayed messages."""
    from tests.support.peers import Peer, socket_dir, wait_path
    from tui.render import rate_text, time_text

    sockets = socket_dir()
    sock = f"{sockets}/d.sock"
    out, tee_path = tmp_path / "live.vqs", tmp_path / "live.jsonl"
    demo = Peer(VQSCOPE + ["demo", "--headless", "--split", "--duration", "120", "--socket", sock], "vqscope demo",
                cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_path(sock + ".introspect", 30, demo.alive)
        rec = vqscope("record", "-o", str(out), "--connect", sock, "--interval", "50", "--duration", "2",
                      "--tee-jsonl", str(tee_path), timeout=120)
        assert rec.returncode == 0, rec.stderr
    finally:
        demo.close()
        shutil.rmtree(sockets, ignore_errors=True)
    tee = [json.loads(line) for line in tee_path.read_text().splitlines()]
    assert len(tee) >= 10  # 2 s at 50 ms, on a busy 2-core machine
    app = replay_app(out, steady=False)  # the analyzer over a real recording
    seen: list[int] = []

    async def body(pilot):
        await shown(pilot, 0, tee[0])
        assert app.cursor.count == len(tee)
        for i in range(1, 6):  # stepping shows each recorded snapshot, exactly
            await pilot.press("right")
            await shown(pilot, i, tee[i])
            assert time_text(tee[i]["time"]) in bar_text(app)
            tx = next(q for q in tee[i]["queues"] if q["index"] == 1)
            assert cell(app, f"{tx['device']}#1", "avail_idx") == str(tx["avail_idx"])
        await pilot.press("home", *["plus"] * len(SPEEDS), "space")  # the fastest speed, play
        deadline = time.monotonic() + 60
        while not (app.cursor.index == len(tee) - 1 and not app.cursor.playing):
            assert time.monotonic() < deadline, f"playback stuck at {app.cursor}"
            seen.append(app.cursor.index)
            await pilot.pause(0.01)
        await pilot.pause()
        assert to_json(app.snapshot) == tee[-1] and f"snapshot {len(tee)}/{len(tee)}" in bar_text(app)
        frame = app.source.frame()
        tx = next(q for q in tee[-1]["queues"] if q["index"] == 1)
        if (tx["device"], 1, "kick") in frame.event_keys:  # the back-end's event stream was recorded
            rates = replay_rates(frame)
            assert cell(app, f"{tx['device']}#1", "kicks_s") == rate_text(rates[(tx["device"], 1)].kicks)
            dt = frame.snapshot.time - frame.previous.time
            assert rates[(tx["device"], 1)].kicks == frame.event_counts.get((tx["device"], 1, "kick"), 0) / dt

    run_app(app, body)
    assert seen == sorted(seen)  # playback only moves forward
    with ReplaySource(str(out)) as src:
        src.to_end()
        requests = {m["request"] for m in src.new_messages()}
        assert {"SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL"} <= requests, requests
        evs = src.events()
        assert all(a.time_ns <= b.time_ns for a, b in zip(evs, evs[1:]))
        assert not evs or evs[-1].time_ns <= to_ns(tee[-1]["time"]) + 1
