"""Replay of a recording: the time cursor (inspector/sources/replay.py), the
ReplayApp's keys and bar (tui/app.py, tui/widgets/replay_bar.py), the CLI
(`vqscope tui|snapshot --replay FILE`), a screen snapshot, and a recording of
a real back-end with real traffic replayed end to end.

Every test but the pure cursor arithmetic reads a REAL recording file: one
written by the recorder's RecordingWriter from fixed data (so screens are
deterministic), or one `vqscope record` made of a running back-end.

Snapshots: `pytest tests/test_tui_replay.py --snapshot-update` after a
deliberate change of the screens, then review the SVGs under
tests/__snapshots__/test_tui_replay/.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inspector.errors import InspectorError, SourceError
from inspector.events import Event
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

from .conftest import ROOT, VQSCOPE

DATA = Path(__file__).parent / "data"
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
            q["avail_idx"] = (q["avail_idx"] + 60 * i) % 65536
            q["used_idx"] = (q["used_idx"] + 60 * i) % 65536
        if i not in ANOMALY_AT:
            tx["anomalies"] = []
        out.append(s)
    return out


def series_events() -> list[list[Event]]:
    """Per snapshot i, the events recorded with it: 5·i kicks of net0 queue 1
    spread over (t(i−1), t(i)], none for queue 0, no calls."""
    out = [[]]
    for i in range(1, COUNT):
        start = to_ns(T0 + STEP * (i - 1))
        n = TX_KICK_EVENTS * i
        out.append([Event(start + (k + 1) * to_ns(STEP) // n, "net0", 1, "kick", 1) for k in range(n)])
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
    return write_recording(tmp_path / "demo.vqrec")


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
    return ReplaySource("x/fake.vqrec", recording=FakeRecording(list(times), list(anomalies)), clock=clock), clock


# --- the cursor (pure arithmetic) ------------------------------------------


def test_cursor_starts_paused_on_the_first_snapshot():
    src, _ = fake_source()
    c = src.cursor()
    assert (c.index, c.count, c.time, c.playing, c.speed) == (0, 5, 0.0, False, 1.0)
    assert src.file_name == "fake.vqrec" and src.name == "fake"


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


def test_a_recording_without_snapshots_is_refused_and_closed():
    rec = FakeRecording([], [])
    with pytest.raises(SourceError, match="holds no snapshot"):
        ReplaySource("empty.vqrec", recording=rec)
    assert rec.closed


def test_a_missing_file_is_a_source_error():
    with pytest.raises(SourceError, match="no recording at /nonexistent/x.vqrec"):
        ReplaySource("/nonexistent/x.vqrec")
